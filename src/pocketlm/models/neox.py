"""GPT-NeoX (Pythia) and Falcon in plain PyTorch: the fused-q/k/v, LayerNorm, GELU family.

Both compute q, k and v in one `query_key_value` matmul, normalise with LayerNorm (with
bias), rotate all or part of each head (GPT-NeoX: `rotary_pct`, a quarter by default), run
a plain GELU MLP (`dense_h_to_4h`, `dense_4h_to_h`) and usually add attention and MLP to
the residual side by side ("parallel residual"): x + attn(norm(x)) + mlp(norm'(x)).
Attention itself, the rotary tables and the KV cache are the Llama family's and the
engine's (models/layers.attend, rope.rotate); only the layers' names and the fused q/k/v
layout are these families' own. Mirrors HF `modeling_gpt_neox.py` and
`modeling_falcon.py`; parameter names line up with their checkpoint keys. Falcon's ALiBi
variant (falcon-rw) is refused. Knows nothing of files, tokenizers or sampling:
`forward(tokens, positions, cache) -> logits`.

The fused layout: the output rows of `query_key_value` come in K groups, one per key/value
head, each holding that group's H/K query heads, then its key head, then its value head
(Falcon's new decoder architecture, HF `_split_heads`). GPT-NeoX and old Falcon without
multi-query are the case K = H (q, k, v of each head side by side); old multi-query Falcon
(falcon-7b) is K = 1 (all queries, then the one key and value).

B = batch, T = time, C = hidden_size, H = heads, K = key/value heads, D = head_dim.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from pocketlm.errors import PocketLMError
from pocketlm.models.cache import KVCache
from pocketlm.models.layers import ACTIVATIONS, CausalLM, attend
from pocketlm.models.rope import rope_cos_sin, rope_inv_freq, rotate


@dataclass
class _Derived:
    """What the layers read, under the same names for both families (set by each config's
    `__post_init__` from its own keys)."""

    num_layers: int = field(init=False)
    num_kv_heads: int = field(init=False)
    head_dim: int = field(init=False)
    context_length: int = field(init=False)
    rotary_dim: int = field(init=False)  # head dimensions rotated: the first ones, in pairs
    ffn_size: int = field(init=False)
    norm_eps: float = field(init=False)
    qkv_bias: bool = field(init=False)  # on query_key_value and the attention's dense
    mlp_bias: bool = field(init=False)
    parallel: bool = field(init=False)  # attention and MLP side by side on the residual
    act: str = field(init=False)

    def _derive(self, *, heads: int, kv_heads: int, partial_rotary_factor: float) -> None:
        hidden = self.hidden_size  # type: ignore[attr-defined]
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by {heads} heads")
        if heads % kv_heads:
            raise ValueError(f"{heads} heads do not split into {kv_heads} key/value heads")
        self.num_kv_heads, self.head_dim = kv_heads, hidden // heads
        self.rotary_dim = int(self.head_dim * partial_rotary_factor)  # as HF rounds it
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"rotary dimensions {self.rotary_dim} are not an even number >= 2")
        self.num_layers = self.num_hidden_layers  # type: ignore[attr-defined]
        self.context_length = self.max_position_embeddings  # type: ignore[attr-defined]
        if self.act not in ACTIVATIONS:
            raise PocketLMError(
                f"unsupported activation {self.act!r} (pocketlm supports {', '.join(ACTIVATIONS)})"
            )

    def _rope(self) -> dict[str, Any]:
        """transformers 5 writes theta, scaling and the rotary share into rope_parameters."""
        params = self.rope_parameters or {}  # type: ignore[attr-defined]
        self.rope_theta = params.get("rope_theta", self.rope_theta)  # type: ignore[attr-defined]
        self.rope_scaling = self.rope_scaling or (params or None)  # type: ignore[attr-defined]
        return params

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        known = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})


@dataclass
class GPTNeoXConfig(_Derived):
    """Keyed like a GPT-NeoX / Pythia config.json (old and transformers 5 names)."""

    vocab_size: int = 50432
    hidden_size: int = 6144
    intermediate_size: int = 24576
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    rotary_pct: float = 0.25  # older config.json names for partial_rotary_factor, theta
    rotary_emb_base: float = 10000.0
    partial_rotary_factor: float | None = None
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    model_type: str = "gpt_neox"

    def __post_init__(self) -> None:
        self.rope_theta = self.rope_theta or self.rotary_emb_base
        params = self._rope()
        factor = params.get("partial_rotary_factor", self.partial_rotary_factor or self.rotary_pct)
        self.partial_rotary_factor = factor
        self.act, self.ffn_size, self.norm_eps = (
            self.hidden_act,
            self.intermediate_size,
            self.layer_norm_eps,
        )
        self.qkv_bias, self.mlp_bias = self.attention_bias, True
        self.parallel = self.use_parallel_residual
        heads = self.num_attention_heads
        self._derive(heads=heads, kv_heads=heads, partial_rotary_factor=factor)


@dataclass
class FalconConfig(_Derived):
    """Keyed like a Falcon config.json: the new decoder architecture (falcon-40b/180b,
    Falcon 2, Falcon3-like: grouped K/V heads, ln_attn and ln_mlp) and the older one
    (falcon-7b: multi-query, one LayerNorm, parallel attention)."""

    vocab_size: int = 65024
    hidden_size: int = 4544
    num_hidden_layers: int = 32
    num_attention_heads: int = 71
    num_kv_heads: int | None = None  # type: ignore[assignment]  # also derived, same meaning
    new_decoder_architecture: bool = False
    multi_query: bool = True
    parallel_attn: bool = True
    num_ln_in_parallel_attn: int | None = None
    alibi: bool = False
    bias: bool = False
    ffn_hidden_size: int | None = None
    activation: str = "gelu"
    layer_norm_epsilon: float = 1e-5
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    tie_word_embeddings: bool = True
    model_type: str = "falcon"
    two_norms: bool = field(init=False)  # ln_attn and ln_mlp (new architecture), else one

    def __post_init__(self) -> None:
        if self.alibi:
            raise PocketLMError(
                "Falcon with ALiBi position biases (alibi: true, e.g. falcon-rw) is not "
                "supported by pocketlm; only rotary Falcons run natively"
            )
        self._rope()
        heads = self.num_attention_heads
        if self.new_decoder_architecture:  # grouped K/V heads; attention and MLP in parallel
            kv_heads = self.num_kv_heads or heads
            self.two_norms = (self.num_ln_in_parallel_attn or 2) == 2
            self.parallel = True
        else:  # falcon-7b: one key/value head for all (multi_query), or one per head
            kv_heads = 1 if self.multi_query else heads
            self.two_norms, self.parallel = False, self.parallel_attn
        self.num_kv_heads = kv_heads
        self.act, self.norm_eps = self.activation, self.layer_norm_epsilon
        self.ffn_size = self.ffn_hidden_size or 4 * self.hidden_size
        self.qkv_bias = self.mlp_bias = self.bias
        self._derive(heads=heads, kv_heads=kv_heads, partial_rotary_factor=1.0)


class FusedAttention(nn.Module):
    def __init__(self, config: GPTNeoXConfig | FalconConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_kv_heads
        self.head_dim, self.rotary_dim = config.head_dim, config.rotary_dim
        C, H, K, D = config.hidden_size, self.n_head, self.n_kv_head, self.head_dim
        self.query_key_value = nn.Linear(C, (H + 2 * K) * D, bias=config.qkv_bias)
        self.dense = nn.Linear(H * D, C, bias=config.qkv_bias)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        # Per key/value head: its H/K query heads, then its key, then its value.
        qkv = self.query_key_value(x).view(B, T, K, H // K + 2, D)  # (B, T, K, H/K + 2, D)
        q = qkv[:, :, :, :-2].reshape(B, T, H, D)  # query head h reads key/value head h // (H/K)
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]  # (B, T, K, D)
        cos, sin = rope  # (B, T, 1, R)
        qk = rotate(torch.cat((q, k), dim=2), cos, sin, self.rotary_dim)  # (B, T, H + K, D)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # (B, H|K, T, D)
        y = attend(q, k, v.transpose(1, 2), layer=self.layer, positions=positions, cache=cache)
        return self.dense(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTNeoXConfig | FalconConfig) -> None:
        super().__init__()
        C, F, bias = config.hidden_size, config.ffn_size, config.mlp_bias
        self.dense_h_to_4h = nn.Linear(C, F, bias=bias)
        self.dense_4h_to_h = nn.Linear(F, C, bias=bias)
        self.act = ACTIVATIONS[config.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: GPTNeoXConfig, layer: int) -> None:
        super().__init__()
        C, eps = config.hidden_size, config.norm_eps
        self.input_layernorm = nn.LayerNorm(C, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(C, eps=eps)
        self.attention = FusedAttention(config, layer)
        self.mlp = MLP(config)
        self.parallel = config.parallel

    def forward(self, x, positions, rope, cache):  # noqa: ANN001, ANN201 - as FusedAttention
        a = self.attention(self.input_layernorm(x), positions, rope, cache)
        if self.parallel:  # both branches read x, each through its own norm
            return x + a + self.mlp(self.post_attention_layernorm(x))
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class FalconLayer(nn.Module):
    def __init__(self, config: FalconConfig, layer: int) -> None:
        super().__init__()
        C, eps = config.hidden_size, config.norm_eps
        if config.two_norms:  # new architecture: a norm for each branch
            self.ln_attn = nn.LayerNorm(C, eps=eps)
            self.ln_mlp = nn.LayerNorm(C, eps=eps)
        else:  # one norm; a second before the MLP only when not parallel
            self.input_layernorm = nn.LayerNorm(C, eps=eps)
            if not config.parallel:
                self.post_attention_layernorm = nn.LayerNorm(C, eps=eps)
        self.self_attention = FusedAttention(config, layer)
        self.mlp = MLP(config)
        self.two_norms, self.parallel = config.two_norms, config.parallel

    def forward(self, x, positions, rope, cache):  # noqa: ANN001, ANN201 - as FusedAttention
        if self.two_norms:
            a = self.self_attention(self.ln_attn(x), positions, rope, cache)
            return x + a + self.mlp(self.ln_mlp(x))
        h = self.input_layernorm(x)
        a = self.self_attention(h, positions, rope, cache)
        if self.parallel:  # falcon-7b: the MLP reads the same normed input
            return x + a + self.mlp(h)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class _RotaryLM(CausalLM):
    """The stack both families share: embedding, layers with one rotary table, final norm."""

    config: GPTNeoXConfig | FalconConfig

    def _parts(self) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
        raise NotImplementedError

    def init_buffers(self, device: torch.device | str) -> None:
        """Recompute the rotary frequencies (built on the meta device while loading)."""
        self.inv_freq = rope_inv_freq(self.config).to(device)  # type: ignore[arg-type]

    def layer_outputs(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None
    ) -> Iterator[torch.Tensor]:
        """The residual stream (B, T, C): after the embeddings, then after each block; the
        last one has the final LayerNorm applied (as HF's `hidden_states`)."""
        embed, layers, final_norm = self._parts()
        x = embed(tokens)
        rope = rope_cos_sin(positions, self.inv_freq, x.dtype)
        for block in layers:
            yield x
            x = block(x, positions, rope, cache)
        yield final_norm(x)


class GPTNeoXModel(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, i) for i in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class GPTNeoX(_RotaryLM):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config)
        # Older checkpoints call it embed_out (weights.tables renames it).
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.gpt_neox.embed_in.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)  # type: ignore[arg-type]

    def _parts(self) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
        m = self.gpt_neox
        return m.embed_in, m.layers, m.final_layer_norm


class FalconModel(nn.Module):
    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(FalconLayer(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class Falcon(_RotaryLM):
    def __init__(self, config: FalconConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = FalconModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)  # type: ignore[arg-type]

    def _parts(self) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
        m = self.transformer
        return m.word_embeddings, m.h, m.ln_f
