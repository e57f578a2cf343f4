"""GPT-2 in plain PyTorch: learned positions, pre-LayerNorm blocks, tied embeddings.

Mirrors OpenAI's gpt-2 `model.py` and Hugging Face's `modeling_gpt2.py`; parameter names
line up with HF checkpoint keys so loading is a rename-free table. Weights are stored in
nn.Linear orientation (the loader transposes HF's Conv1D). Knows nothing of files,
tokenizers or sampling: `forward(tokens, positions, cache) -> logits`.

B = batch, T = time, C = channels (n_embd), H = heads, D = head dim (C / H).
"""

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from pocketlm.models.cache import KVCache
from pocketlm.models.layers import ACTIVATIONS, CausalLM, attend


@dataclass
class GPT2Config:
    """Keyed like a GPT-2 config.json; unknown keys are ignored."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = True
    # Derived, for the engine: the same names on every architecture's config.
    head_dim: int = field(init=False)
    num_layers: int = field(init=False)
    num_kv_heads: int = field(init=False)
    context_length: int = field(init=False)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        self.n_inner = self.n_inner or 4 * self.n_embd
        self.head_dim = self.n_embd // self.n_head
        self.num_layers = self.n_layer
        self.num_kv_heads = self.n_head
        self.context_length = self.n_positions

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPT2Config":
        known = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.layer, self.n_head = layer, config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)
        )  # (B, H, T, D)
        y = attend(q, k, v, layer=self.layer, positions=positions, cache=cache)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.act = ACTIVATIONS[config.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), positions, cache)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2(CausalLM):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def layer_outputs(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None
    ) -> Iterator[torch.Tensor]:
        """The residual stream (B, T, C): after the embeddings, then after each block; the
        last one has the final LayerNorm applied (as HF's `hidden_states`)."""
        t = self.transformer
        x = t.wte(tokens) + t.wpe(positions)
        for block in t.h:
            yield x
            x = block(x, positions, cache)
        yield t.ln_f(x)

    def init_buffers(self, device: torch.device | str) -> None:
        """GPT-2 has no computed buffers (the causal mask comes from positions)."""
