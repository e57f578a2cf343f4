"""A sparse mixture-of-experts MLP: a router picks the top k of n experts per token, and
only those run, each once on all the tokens routed to it.

Mixtral (HF `modeling_mixtral.py`: softmax over the experts, top k, renormalised), Qwen2-MoE
(`modeling_qwen2_moe.py`: renormalised only with norm_topk_prob, plus a shared expert
scaled by a sigmoid gate) and Qwen3-MoE (`modeling_qwen3_moe.py`: as Qwen2-MoE without
the shared expert). The experts are whatever module the architecture makes (Llama's
SwiGLU MLP), kept as separate modules so that everything done to a linear layer (fusing
gate/up, int8/int4, a GGUF matrix kept as stored) is done to theirs alike; the router is
a `Router`, which those passes leave in float (a routing decision flipped by rounding
changes a token's whole MLP).

Knows nothing of checkpoints or of which family it serves. M = rows (tokens), C = hidden,
E = experts, k = experts per token.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Linear):
    """A small linear layer that decides rather than transforms (the router, a shared
    expert's gate). A subclass so that `replace_linears` (quantization, re-layouts) and
    a GGUF load as stored, which take plain nn.Linear only, keep it in float."""


class SparseMoE(nn.Module):
    """y = sum over the token's top-k experts e of w_e * expert_e(x)
    (+ sigmoid(shared_expert_gate(x)) * shared_expert(x))."""

    def __init__(
        self,
        *,
        hidden: int,
        n_experts: int,
        top_k: int,
        renormalize: bool,
        expert: Callable[[], nn.Module],
        shared_expert: nn.Module | None = None,
        router_bias: bool = False,
    ) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = Router(hidden, n_experts, bias=router_bias)  # HF's name: `mlp.gate`
        self.experts = nn.ModuleList(expert() for _ in range(n_experts))
        self.shared_expert = shared_expert
        self.shared_expert_gate = None if shared_expert is None else Router(hidden, 1, bias=False)

    def fuse(self) -> None:
        """Fuse each expert's projections that share an input (inference only)."""
        for expert in [*self.experts, *([self.shared_expert] if self.shared_expert else [])]:
            if hasattr(expert, "fuse"):
                expert.fuse()

    def route(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows (M, C) -> each token's expert weights and expert ids, both (M, k)."""
        # In fp32 as HF does: near-equal probabilities must rank the same in any dtype.
        probs = F.softmax(self.gate(rows).float(), dim=-1)  # (M, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (M, k)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(rows.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])  # (M, C)
        weights, chosen = self.route(rows)
        y = self.mix(rows, weights, chosen)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(rows)) * self.shared_expert(rows)
        return y.view(shape)

    def mix(self, rows: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the chosen experts' outputs (M, C), grouped by expert: the
        (token, slot) pairs are sorted by expert, and each expert that has any runs once on
        its tokens. A decode step so reads k experts' weights, never all E."""
        k = self.top_k
        order = chosen.flatten().argsort(stable=True)  # (M*k,) pairs, grouped by expert
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()
        flat_weights = weights.flatten()  # (M*k,)
        out = torch.zeros_like(rows)
        start = 0
        for expert, n in zip(self.experts, counts, strict=True):
            if n == 0:
                continue
            pairs = order[start : start + n]
            start += n
            tokens = pairs // k  # each pair's row in `rows`
            y = expert(rows[tokens]) * flat_weights[pairs, None]  # (n, C)
            # index_put_, not index_add_: the latter took ~70 ms a call on a busy 2-core
            # CPU with several threads (torch 2.13), this ~7 us.
            out.index_put_((tokens,), y.to(out.dtype), accumulate=True)
        return out
