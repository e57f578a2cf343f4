"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3, SmolLM 1-3, OLMo 2, Granite;
the mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE; Gemma 1-3 through models/gemma.py)
in plain PyTorch.

RMSNorm, rotary embeddings (default, linear, llama3, YaRN and LongRoPE scaling, or
llama.cpp's per-pair frequency factors), grouped-query attention, gated MLP (SwiGLU, or
GeGLU with tanh-GELU), optional q/k/v bias (Qwen2), optional per-head RMSNorm of q and k
before rotary (Qwen3, HF `modeling_qwen3.py`), optional sliding window (Mistral, Phi-3:
every layer; Gemma: some), q/k/v and gate/up stored as one matrix each (Phi-3, HF
`modeling_phi3.py`), tied or untied embeddings; with experts in the config, a sparse MoE
MLP (models/moe.py) on the layers the config makes sparse. Parameter names line up with
HF `LlamaForCausalLM` (and `Phi3ForCausalLM`, Qwen2-MoE's `mlp.experts.{e}.gate_proj`)
keys. Mirrors HF `modeling_llama.py`
(rotate_half layout, computed as a roll) and gpt-fast `model.py`.

StableLM and Starcoder2 are variants (HF `modeling_stablelm.py`, `modeling_starcoder2.py`):
LayerNorm, StableLM's per-head q/k LayerNorm and parallel residual, Starcoder2's plain MLP.

Gemma is this block with switches that `GemmaConfig` (models/gemma.py) turns on, each a
derived field of the config (HF `modeling_gemma.py`, `modeling_gemma2.py`,
`modeling_gemma3.py`): RMSNorm weights that are offsets from 1, embeddings scaled by
sqrt(hidden_size), norms around the attention and the MLP outputs too ("sandwich"), an
attention scale of its own, soft-capped attention scores and logits, a window per layer,
and a rotary base of their own for the sliding layers.

Three more families are switches that their model_type turns on here: SmolLM3
(`modeling_smollm3.py`) leaves rotary out of the layers `no_rope_layers` marks ("NoPE");
OLMo 2 (`modeling_olmo2.py`) norms each sublayer's output and not its input (Gemma's
sandwich without its inner half) and RMS-norms the whole q and k projections, not each
head; Granite (`modeling_granite.py`) multiplies the embeddings, the attention scores (in
place of 1/sqrt(head_dim)) and each sublayer's output, and divides the logits. Knows
nothing of files, tokenizers or sampling: `forward(tokens, positions, cache) -> logits`.

B = batch, T = time, C = hidden_size, H = heads, K = key/value heads, D = head_dim.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import pocketlm.models.layers as layers
from pocketlm.errors import PocketLMError
from pocketlm.models.cache import KVCache
from pocketlm.models.layers import ACTIVATIONS, CausalLM, attend, concat_linears
from pocketlm.models.moe import SparseMoE
from pocketlm.models.rope import rope_attention_factor, rope_cos_sin, rope_inv_freq, rotate
from pocketlm.models.variants import variant_switches


@dataclass
class LlamaConfig:
    """Keyed like a Llama/Mistral/Qwen2/Qwen3/SmolLM3/OLMo 2/Granite/StableLM/Starcoder2
    config.json (and
    Mixtral's, Qwen2-MoE's, Qwen3-MoE's); unknown keys are ignored."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None  # transformers 5 writes theta + scaling here
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = True
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    partial_rotary_factor: float = 1.0  # the share of each head that rotary rotates
    original_max_position_embeddings: int | None = None  # Phi-3 keeps it out of rope_scaling
    layer_norm_eps: float | None = None  # StableLM
    norm_epsilon: float | None = None  # Starcoder2
    use_qkv_bias: bool = False  # StableLM: bias on q, k, v (not o)
    qk_layernorm: bool = False  # StableLM: a LayerNorm of each head of q and k, own weights
    use_parallel_residual: bool = False  # StableLM: x + attn(norm(x)) + mlp(norm(x))
    use_bias: bool = False  # Starcoder2: bias on every projection
    model_type: str = "llama"
    # Mixture of experts: Mixtral says num_local_experts, Qwen2/3-MoE num_experts.
    num_local_experts: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = (
        None  # Qwen: the experts' width (Mixtral: intermediate_size)
    )
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert
    norm_topk_prob: bool = False  # renormalise the top-k weights (Mixtral always does)
    decoder_sparse_step: int = 1  # Qwen: every this-many-th layer is sparse...
    mlp_only_layers: list[int] = field(default_factory=list)  # ...but for these
    qkv_bias: bool = True  # Qwen2-MoE's name for attention_bias
    # SmolLM3: 1 where a layer rotates q and k, 0 where it does not (HF's name reads
    # backwards); by default every no_rope_layer_interval-th layer does not.
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4
    # Granite: the embeddings' scale, the attention scores' scale (in place of
    # 1/sqrt(head_dim)), each sublayer output's scale, and what the logits are divided by.
    embedding_multiplier: float = 1.0
    attention_multiplier: float | None = None
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # Derived, for the engine: the same names on every architecture's config.
    num_layers: int = field(init=False)
    num_kv_heads: int = field(init=False)
    context_length: int = field(init=False)
    qk_norm: bool = field(init=False)  # Qwen3's per-head RMSNorm of q and k (no config key)
    n_experts: int = field(init=False)  # 0: a dense model
    rotary_dim: int = field(init=False)  # head dimensions rotated: the first ones, in pairs
    # Switches Llama leaves off and Gemma's config turns on (models/gemma.py says why).
    unit_offset_norms: bool = field(init=False)  # RMSNorm scales by (1 + weight), in fp32
    scale_embeddings: bool = field(init=False)  # embeddings times sqrt(hidden_size)
    sandwich_norms: bool = field(init=False)  # attention and MLP outputs RMS-normed too
    attention_scale: float | None = field(init=False)  # None: 1 / sqrt(head_dim)
    attention_softcap: float | None = field(init=False)  # scores -> cap * tanh(scores / cap)
    final_softcap: float | None = field(init=False)  # the same on the logits
    layer_windows: list[int | None] = field(init=False)  # each layer's sliding window
    local_rope_theta: float | None = field(init=False)  # rotary base of windowed layers
    # Phi-3: q/k/v stored as one qkv_proj, gate/up as one gate_up_proj (HF's names).
    fused_projections: bool = field(init=False)
    # LongRoPE: a sequence longer than this many tokens rotates with the long factors.
    rope_switch_length: int | None = field(init=False)
    # Switches of SmolLM3, OLMo 2 and Granite (set by models/variants.py).
    layer_rotary: list[bool] = field(init=False)  # whether each layer rotates q and k
    input_norms: bool = field(init=False)  # sublayer inputs RMS-normed (all but OLMo 2)
    qk_norm_across_heads: bool = field(init=False)  # OLMo 2's norm of all of q, all of k
    layer_norm: bool = field(init=False)  # LayerNorm with bias (StableLM, Starcoder2), not RMS
    norm_eps: float = field(init=False)  # the eps of every norm, RMS or Layer
    gated_mlp: bool = field(init=False)  # act(gate) * up (SwiGLU), or Starcoder2's act(c_fc)
    # Switches GPT-OSS's config turns on (models/gpt_oss.py says why).
    attention_sinks: bool = field(init=False)  # a learned logit per head in each softmax
    router_bias: bool = field(init=False)  # the MoE router has a bias
    swiglu_clamp: tuple[float, float] | None = field(init=False)  # (alpha, limit): see MLP

    def __post_init__(self) -> None:
        if self.rope_parameters:
            self.rope_theta = self.rope_parameters.get("rope_theta", self.rope_theta)
            self.rope_scaling = self.rope_scaling or self.rope_parameters
            self.partial_rotary_factor = self.rope_parameters.get(
                "partial_rotary_factor", self.partial_rotary_factor
            )
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.rotary_dim = int(self.head_dim * self.partial_rotary_factor)  # as HF rounds it
        self.num_layers = self.num_hidden_layers
        self.num_kv_heads = self.num_key_value_heads
        self.context_length = self.max_position_embeddings
        self.qk_norm = self.model_type in ("qwen3", "qwen3_moe")
        self.fused_projections = self.model_type == "phi3"
        self.rope_scaling = self._standard_rope_scaling()
        longrope = (self.rope_scaling or {}).get("rope_type") == "longrope"
        self.rope_switch_length = (
            self.rope_scaling["original_max_position_embeddings"] if longrope else None
        )
        if self.model_type == "qwen2":
            # Qwen2 always has q/k/v bias (Qwen3 says so in attention_bias, default false).
            self.attention_bias = True
        if self.model_type == "qwen2_moe":
            self.attention_bias = self.qkv_bias
        if self.model_type in (*QWEN_TYPES, "smollm3") and not self.use_sliding_window:
            self.sliding_window = None  # their configs say sliding window only by this flag
        if self.model_type in ("qwen3", "qwen2_moe") and self.sliding_window is not None:
            # They window only the layers from max_window_layers on; no released one does.
            # (Qwen3-MoE windows every layer, as Mistral does.)
            raise PocketLMError(
                f"{self.model_type} with use_sliding_window is not supported by pocketlm"
            )
        self.n_experts = self.num_experts or self.num_local_experts
        if self.model_type == "mixtral":
            self.norm_topk_prob = True
        if self.model_type == "stablelm":
            self.attention_bias = self.use_qkv_bias  # o_proj has none (see Attention)
        if self.model_type == "starcoder2":
            self.attention_bias = self.mlp_bias = self.use_bias
        self.layer_norm = self.model_type in ("stablelm", "starcoder2")
        layer_eps = self.layer_norm_eps or self.norm_epsilon or 1e-5  # StableLM's, Starcoder2's
        self.norm_eps = layer_eps if self.layer_norm else self.rms_norm_eps
        self.gated_mlp = self.model_type != "starcoder2"
        if self.hidden_act not in ACTIVATIONS:
            raise PocketLMError(
                f"unsupported hidden_act {self.hidden_act!r} "
                f"(pocketlm supports {', '.join(ACTIVATIONS)})"
            )
        self.unit_offset_norms = self.scale_embeddings = self.sandwich_norms = False
        self.attention_scale = self.attention_softcap = self.final_softcap = None
        self.layer_windows = [self.sliding_window] * self.num_hidden_layers
        self.local_rope_theta = None
        self.attention_sinks = self.router_bias = False
        self.swiglu_clamp = None
        variant_switches(self)  # SmolLM3, OLMo 2, Granite (models/variants.py)

    def is_sparse(self, layer: int) -> bool:
        """Whether this layer's MLP is a mixture of experts (HF Qwen2MoeDecoderLayer's rule;
        every layer of a Mixtral)."""
        return (
            self.n_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def _standard_rope_scaling(self) -> dict[str, Any] | None:
        """rope_scaling as transformers' `standardize_rope_params` leaves it: the type under
        "rope_type", and the pretraining context of the types that scale beyond it (a
        top-level original_max_position_embeddings wins, as Phi-3's does; else the context)."""
        if not self.rope_scaling:
            return None
        scaling = dict(self.rope_scaling)  # a copy: the caller's config stays as it was
        kind = scaling.setdefault("rope_type", scaling.get("type", "default"))
        if self.model_type == "phi3" and kind in ("su", "yarn"):
            kind = scaling["rope_type"] = "longrope"  # older Phi-3 names (HF Phi3Config)
        if kind in ("llama3", "yarn", "longrope"):
            if self.original_max_position_embeddings is not None:
                scaling["original_max_position_embeddings"] = self.original_max_position_embeddings
            scaling.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        return scaling

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        known = {f.name for f in fields(cls) if f.init}
        # A key a config.json leaves out takes its family's default in transformers.
        defaults = FAMILY_DEFAULTS.get(d.get("model_type", ""), {})
        given = {k: v for k, v in d.items() if k in known and v is not None}
        return cls(**{**defaults, **given})


# Where a family's transformers config class has other defaults than Llama's. StableLM
# rotates a quarter of each head unless told; a Starcoder2 config.json may leave out its
# biases, tied head and GELU (transformers writes only what differs from its defaults).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "stablelm": {"partial_rotary_factor": 0.25},
    "starcoder2": {"use_bias": True, "tie_word_embeddings": True, "hidden_act": "gelu_pytorch_tanh"},
}  # fmt: skip


# The Qwen model types whose configs switch a sliding window on by use_sliding_window.
QWEN_TYPES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as HF does, then cast back: bf16 rounding here shows in the logits.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x * rsqrt(mean(x^2) + eps)
        if self.unit_offset:  # Gemma stores weight - 1 and scales before the cast (GemmaRMSNorm)
            return (y * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * y.to(x.dtype)


def _norm(config: LlamaConfig, dim: int) -> nn.Module:
    """The family's norm: RMSNorm, or LayerNorm with bias (StableLM, Starcoder2)."""
    if config.layer_norm:
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, config.rms_norm_eps, unit_offset=config.unit_offset_norms)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.window = config.layer_windows[layer]
        self.scale, self.softcap = config.attention_scale, config.attention_softcap
        self.rotary_dim = config.rotary_dim
        self.rotary = config.layer_rotary[layer]  # False on SmolLM3's NoPE layers
        C, bias = config.hidden_size, config.attention_bias
        q, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.qkv_proj: nn.Module | None = None  # set by `fuse()`, or stored so (Phi-3)
        if config.fused_projections:
            self.qkv_proj = nn.Linear(C, q + 2 * kv, bias=bias)  # rows: q, then k, then v
        else:
            self.q_proj = nn.Linear(C, q, bias=bias)
            self.k_proj = nn.Linear(C, kv, bias=bias)
            self.v_proj = nn.Linear(C, kv, bias=bias)
        # Qwen2's (and Qwen2-MoE's) and StableLM's bias is on q, k and v only; Llama's,
        # Qwen3's (and Qwen3-MoE's) and Starcoder2's attention_bias covers o too.
        o_bias = bias and config.model_type not in ("qwen2", "qwen2_moe", "stablelm")
        self.o_proj = nn.Linear(q, C, bias=o_bias)
        if config.qk_norm:  # Qwen3: one weight per head dimension, shared by every head
            self.q_norm = _norm(config, self.head_dim)
            self.k_norm = _norm(config, self.head_dim)
        elif config.qk_norm_across_heads:  # OLMo 2: one weight per q (k) channel
            self.q_norm = _norm(config, self.n_head * self.head_dim)
            self.k_norm = _norm(config, self.n_kv_head * self.head_dim)
        self.qk_norm, self.qk_norm_across_heads = config.qk_norm, config.qk_norm_across_heads
        self.qk_layernorm = config.qk_layernorm
        if config.qk_layernorm:  # StableLM: a LayerNorm per head, each with its own weight
            self.q_layernorm = layers.HeadLayerNorm(self.head_dim, self.n_head, config.norm_eps)
            self.k_layernorm = layers.HeadLayerNorm(self.head_dim, self.n_kv_head, config.norm_eps)
        # GPT-OSS: one logit per head that joins each softmax (see layers.explicit_attention)
        self.sinks = nn.Parameter(torch.zeros(self.n_head)) if config.attention_sinks else None

    def fuse(self) -> None:
        """Replace q/k/v_proj by one matmul (for inference: one weight read, one kernel
        launch). The checkpoint names are gone afterwards, so training never fuses."""
        if self.qkv_proj is not None:
            return
        self.qkv_proj = concat_linears([self.q_proj, self.k_proj, self.v_proj])
        if self.qkv_proj is not None:
            del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qkv = qkv.view(B, T, H + 2 * K, D)  # (B, T, H + 2K, D)
        # Rotate q and k in one go: they sit side by side along the head axis.
        cos, sin = rope  # (B, T, 1, D)
        qk = qkv[:, :, : H + K]
        if self.qk_norm:  # Qwen3: each head of q and of k RMS-normed, before the rotation
            qk = torch.cat((self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])), dim=2)
        elif self.qk_norm_across_heads:  # OLMo 2: all heads of q as one vector, so of k
            q = self.q_norm(qk[:, :, :H].flatten(2)).view(B, T, H, D)
            k = self.k_norm(qk[:, :, H:].flatten(2)).view(B, T, K, D)
            qk = torch.cat((q, k), dim=2)  # (B, T, H + K, D)
        if self.qk_layernorm:  # StableLM: the same place, a LayerNorm of each head's own
            qk = torch.cat((self.q_layernorm(qk[:, :, :H]), self.k_layernorm(qk[:, :, H:])), dim=2)
        if self.rotary:
            qk = rotate(qk, cos, sin, self.rotary_dim)  # (B, T, H + K, D)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # (B, H|K, T, D)
        v = qkv[:, :, H + K :].transpose(1, 2)  # (B, K, T, D)
        y = attend(
            q,
            k,
            v,
            layer=self.layer,
            positions=positions,
            cache=cache,
            window=self.window,
            scale=self.scale,
            softcap=self.softcap,
            sinks=self.sinks,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig, width: int | None = None) -> None:
        super().__init__()
        C, F, bias = config.hidden_size, width or config.intermediate_size, config.mlp_bias
        self.gate_up_proj: nn.Module | None = None  # set by `fuse()`, or stored so (Phi-3)
        if config.fused_projections:
            self.gate_up_proj = nn.Linear(C, 2 * F, bias=bias)  # rows: gate, then up
        else:
            self.gate_proj = nn.Linear(C, F, bias=bias)
            self.up_proj = nn.Linear(C, F, bias=bias)
        self.down_proj = nn.Linear(F, C, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]
        self.clamp = config.swiglu_clamp

    def fuse(self) -> None:
        """Replace gate_proj and up_proj by one matmul (inference only, as Attention.fuse)."""
        if self.gate_up_proj is not None:
            return
        self.gate_up_proj = concat_linears([self.gate_proj, self.up_proj])
        if self.gate_up_proj is not None:
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        if self.clamp is None:  # inline, not through glu(): this runs every layer and token
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.glu(gate, up))

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """act(gate) * up; GPT-OSS's experts clamp both first (gate from above, up both
        ways), gate by x * sigmoid(alpha * x) and add 1 to up (HF GptOssExperts._apply_gate)."""
        if self.clamp is None:
            return self.act(gate) * up
        alpha, limit = self.clamp
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int) -> None:
        super().__init__()
        C = config.hidden_size
        # OLMo 2 norms no sublayer input: an Identity holds no weight, so no checkpoint key.
        input_norm = partial(_norm, config, C) if config.input_norms else nn.Identity
        self.input_layernorm = input_norm()
        self.self_attn = Attention(config, layer)
        # StableLM's parallel residual feeds the MLP the same normed input: no second norm.
        self.post_attention_layernorm = None if config.use_parallel_residual else _norm(config, C)
        if config.is_sparse(layer):
            self.mlp = sparse_mlp(config)
        elif config.gated_mlp:
            self.mlp = MLP(config)
        else:  # Starcoder2's
            F, act = config.intermediate_size, config.hidden_act
            self.mlp = layers.PlainMLP(C, F, act=act, bias=config.mlp_bias)
        self.sandwich = config.sandwich_norms
        if self.sandwich:  # Gemma 2/3, OLMo 2: post_attention_layernorm norms attention's output
            self.pre_feedforward_layernorm = input_norm()
            self.post_feedforward_layernorm = _norm(config, C)
        self.residual_multiplier = config.residual_multiplier  # Granite's; 1 elsewhere

    def forward(self, x, positions, rope, cache):  # noqa: ANN001, ANN201 - same as Attention
        if self.sandwich:
            h = self.self_attn(self.input_layernorm(x), positions, rope, cache)
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        h = self.input_layernorm(x)
        m = self.residual_multiplier  # Granite's; at 1 no multiply (a kernel launch a step)
        if self.post_attention_layernorm is None:  # parallel residual
            attn, mlp = self.self_attn(h, positions, rope, cache), self.mlp(h)
            return x + attn + mlp if m == 1 else x + attn * m + mlp * m
        attn = self.self_attn(h, positions, rope, cache)
        x = x + (attn if m == 1 else attn * m)
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + (mlp if m == 1 else mlp * m)


def sparse_mlp(config: LlamaConfig) -> SparseMoE:
    """Mixtral's / Qwen2-MoE's / Qwen3-MoE's / GPT-OSS's experts: Llama MLPs of the expert
    width (with GPT-OSS's biases and clamped SwiGLU where its config says), and Qwen2-MoE's
    shared expert beside them."""
    width = config.moe_intermediate_size or config.intermediate_size
    shared = config.shared_expert_intermediate_size
    return SparseMoE(
        hidden=config.hidden_size,
        n_experts=config.n_experts,
        top_k=config.num_experts_per_tok,
        renormalize=config.norm_topk_prob,
        expert=lambda: MLP(config, width),
        shared_expert=MLP(config, shared) if shared else None,
        router_bias=config.router_bias,
    )


class Decoder(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = _norm(config, config.hidden_size)


class Llama(CausalLM):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.logit_softcap, self.logits_scaling = config.final_softcap, config.logits_scaling
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        if config.local_rope_theta is not None:  # Gemma 3: the sliding layers' own base
            self.register_buffer("inv_freq_local", rope_inv_freq(config, local=True), False)
        # LongRoPE's second set of frequencies, for sequences past its switch length.
        long = rope_inv_freq(config, long=True) if config.rope_switch_length else None
        self.register_buffer("long_inv_freq", long, persistent=False)
        self.attention_factor = rope_attention_factor(config)

    def fuse(self) -> None:
        """Fuse each layer's q/k/v and gate/up projections (for inference only)."""
        for block in self.model.layers:
            block.self_attn.fuse()
            if not isinstance(block.mlp, layers.PlainMLP):  # Starcoder2's has no gate to fuse
                block.mlp.fuse()

    def init_buffers(self, device: torch.device | str) -> None:
        """Recompute the rotary frequencies (built on the meta device while loading)."""
        self.inv_freq = rope_inv_freq(self.config).to(device)
        if self.config.local_rope_theta is not None:
            self.inv_freq_local = rope_inv_freq(self.config, local=True).to(device)
        if self.long_inv_freq is not None:
            self.long_inv_freq = rope_inv_freq(self.config, long=True).to(device)

    def rope(
        self, positions: torch.Tensor, dtype: torch.dtype, inv_freq: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin (B, T, 1, R) of every position's rotary angles (at the
        model's frequencies, or the `inv_freq` given), R the rotated dimensions of a head
        (D, or fewer with partial rotary); the model's own carry YaRN's or LongRoPE's
        attention factor."""
        scale = 1.0 if inv_freq is not None else self.attention_factor
        if inv_freq is None:
            inv_freq = self.inv_freq  # (R/2,)
            if self.long_inv_freq is not None:
                # LongRoPE, as HF's `longrope_frequency_update`: the long factors once the
                # sequence (its furthest position + 1) passes the switch length, the short
                # ones before -- chosen per row here, so a row in a batch rotates as it
                # would alone (HF takes the whole batch's furthest position).
                long = positions.amax(dim=-1) + 1 > self.config.rope_switch_length  # (B,)
                inv_freq = torch.where(long[:, None, None], self.long_inv_freq, inv_freq)
        return rope_cos_sin(positions, inv_freq, dtype, scale=scale)

    def layer_outputs(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None
    ) -> Iterator[torch.Tensor]:
        """The residual stream (B, T, C): after the embeddings, then after each block; the
        last one has the final RMSNorm applied (as HF's `hidden_states`)."""
        x = self.model.embed_tokens(tokens)
        if self.config.scale_embeddings:  # Gemma: the scale rounded to x's dtype, as HF does
            x = x * torch.tensor(self.config.hidden_size**0.5).to(x.dtype)
        if self.config.embedding_multiplier != 1:  # Granite
            x = x * self.config.embedding_multiplier
        rope = self.rope(positions, x.dtype)
        local = rope
        if self.config.local_rope_theta is not None:
            local = self.rope(positions, x.dtype, self.inv_freq_local)
        for block in self.model.layers:
            yield x
            x = block(x, positions, rope if block.self_attn.window is None else local, cache)
        yield self.model.norm(x)
