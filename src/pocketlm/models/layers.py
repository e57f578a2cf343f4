"""What the architectures share: causal attention masks and attention itself (through
PyTorch's SDPA, or with explicit scores where they are soft-capped or a sink takes a share
of the softmax, which SDPA cannot do),
the `CausalLM` base (its head, an optional soft cap or divisor of the logits, and
`forward`), activations, a plain MLP and a per-head LayerNorm, and nn.Linear surgery
(concatenating layers that read one input, replacing every linear by a faster kind).

Dimension letters: B = batch, T = new tokens, S = key slots, H = heads, D = head dim,
C = channels. Positions are explicit everywhere so the same code serves a whole
sequence, a prefill into the cache, a one-token decode step and a ragged batch.
"""

from collections import deque
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.models.cache import KVCache

# Activations by their config.json names (GPT-2's activation_function, Llama's hidden_act,
# Falcon's activation); the tanh GELUs are one function under two names.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


def attention_mask(
    q_positions: torch.Tensor, k_positions: torch.Tensor, *, window: int | None = None
) -> torch.Tensor:
    """Boolean (B, 1, T, S): query at position p may see keys at positions <= p
    (and > p - window with a sliding window)."""
    q = q_positions[:, None, :, None]  # (B, 1, T, 1)
    k = k_positions[:, None, None, :]  # (B, 1, 1, S)
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layer: int,
    positions: torch.Tensor,
    cache: KVCache | None,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention of q (B, Hq, T, D) over k, v (B, Hkv, T, D), going
    through the cache when there is one. Returns (B, Hq, T, D). `scale` multiplies the
    scores (default 1 / sqrt(D)); `softcap` then bounds them to (-cap, cap) by
    cap * tanh(score / cap) (Gemma 2); `sinks` (Hq,) are one more logit per head in the
    softmax, a slot attended to that holds no value (GPT-OSS)."""
    if cache is None:
        mask = attention_mask(positions, positions, window=window)
    else:
        # Only slots up to the furthest position hold anything this step can see (the
        # cache uses the same number to know whether it must grow first).
        n_slots = cache.visible if cache.visible is not None else int(positions.max()) + 1
        k, v = cache.update(layer, positions, k, v, end=n_slots)
        k, v = k[:, :, :n_slots], v[:, :, :n_slots]  # (B, Hkv, S, D)
        if q.shape[0] == 1 and q.shape[2] == 1 and (window is None or n_slots <= window):
            # One decode step: the only query is the newest position and sees every slot,
            # so the mask would be all True; without one SDPA takes its fastest kernel.
            mask = None
        else:
            k_positions = torch.arange(n_slots, device=q.device).expand(q.shape[0], n_slots)
            mask = attention_mask(positions, k_positions, window=window)
    if softcap is not None or sinks is not None:
        return explicit_attention(q, k, v, mask=mask, scale=scale, softcap=softcap, sinks=sinks)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


# Queries per pass of explicit_attention: its scores are (B, H, QUERY_CHUNK, S) floats, so
# a long prefill never holds all T x S of them at once (GPT-OSS: 64 heads x 8k x 8k x 4 bytes
# would be 17 GB a layer).
QUERY_CHUNK = 256


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scale: float | None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with its scores written out, for what SDPA cannot do between the product
    and the softmax: soft-capped scores (HF Gemma 2's `eager_attention_forward`) and
    attention sinks (HF GPT-OSS's: a learned logit per head joins each row's softmax and
    is dropped after it, so the weights of the real keys sum to less than 1). Query heads
    are grouped by the key/value head they share, so keys and values are not repeated."""
    if q.shape[2] > QUERY_CHUNK:
        chunks = range(0, q.shape[2], QUERY_CHUNK)
        return torch.cat([explicit_attention(
            q[:, :, i : i + QUERY_CHUNK], k, v, scale=scale, softcap=softcap, sinks=sinks,
            mask=None if mask is None else mask[:, :, i : i + QUERY_CHUNK],
        ) for i in chunks], dim=2)  # fmt: skip
    B, H, T, D = q.shape
    K = k.shape[1]
    qg = q.view(B, K, H // K, T, D)  # (B, K, G, T, D): head h reads kv head h // G
    scores = qg @ k[:, :, None].transpose(-1, -2) * (D**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)  # (B, K, G, T, S)
    if mask is not None:  # (B, 1, T, S) -> (B, 1, 1, T, S); a large negative, as HF's mask
        scores = scores.masked_fill(~mask[:, None], torch.finfo(scores.dtype).min)
    if sinks is None:
        weights = scores.softmax(dim=-1, dtype=torch.float32)
    else:
        sink = sinks.to(scores.dtype).view(1, K, H // K, 1, 1).expand(B, K, H // K, T, 1)
        weights = torch.cat((scores, sink), dim=-1).softmax(dim=-1, dtype=torch.float32)
        weights = weights[..., :-1]  # (B, K, G, T, S): the sink's share goes nowhere
    return (weights.to(q.dtype) @ v[:, :, None]).view(B, H, T, D)  # (B, H, T, D)


class HeadLayerNorm(nn.Module):
    """StableLM's qk_layernorm: each head's own LayerNorm (weight, no bias) over its D
    dimensions. Kept as a list of norms so the names line up with HF's `norms.{h}`."""

    def __init__(self, dim: int, n_heads: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=eps, bias=False) for _ in range(n_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, heads, D)
        weight = torch.stack([norm.weight for norm in self.norms])  # (heads, D)
        return F.layer_norm(x, (x.shape[-1],), eps=self.eps) * weight


class PlainMLP(nn.Module):
    """An MLP without a gate, c_proj(act(c_fc(x))), named as Starcoder2's (and GPT-2's)."""

    def __init__(self, dim: int, inner: int, *, act: str, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, inner, bias=bias)
        self.c_proj = nn.Linear(inner, dim, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


def concat_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One nn.Linear that computes the given ones side by side (outputs concatenated), for
    fusing projections that read the same input into one matmul at inference time.
    Other layer types (a quantized linear) provide their own `concat`, which takes any
    plain nn.Linear among them too. None where the layers are of two such types (a
    GGUF's Q4_0 q and k as int4 beside its Q8_0 v as int8): they stay apart."""
    kinds = {type(lin) for lin in linears} - {nn.Linear}
    if len(kinds) > 1:
        return None
    if kinds:
        return kinds.pop().concat(linears)
    weight = torch.cat([lin.weight for lin in linears])
    has_bias = linears[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([lin.bias for lin in linears]), requires_grad=False)
    return fused


def replace_linears(
    model: nn.Module, make: Callable[[str, nn.Linear], nn.Module | None]
) -> nn.Module:
    """Replace each plain nn.Linear in `model` by `make(attribute name, layer)` (None keeps
    it), in place. No reference to a replaced layer is held past its turn, so its weight is
    freed (a memory-mapped one unmapped) before the next is built: converting a model
    costs one layer of extra memory, not a second copy of the model."""
    parents = [m for m in model.modules() if any(type(c) is nn.Linear for c in m.children())]
    for parent in parents:
        for name in [n for n, c in parent.named_children() if type(c) is nn.Linear]:
            new = make(name, getattr(parent, name))
            if new is not None:
                setattr(parent, name, new)
    return model


class CausalLM(nn.Module):
    """What every architecture shares above its layers: `layer_outputs` (defined by each)
    yields the residual stream, and the head turns the last of it into logits."""

    lm_head: nn.Module
    logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    logits_scaling: float = 1.0  # logits divided by it (Granite)

    def layer_outputs(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None
    ) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        *,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """tokens, positions (B, T) -> logits (B, T, vocab), or (B, logits_to_keep, vocab)
        for the last positions only (as HF's argument: a prefill needs just the last, and
        the head is the largest matrix)."""
        # Only the last (final-normed) stream is kept: deque(maxlen=1) drops the others.
        x = deque(self.layer_outputs(tokens, positions, cache), maxlen=1).pop()
        x = x[:, -logits_to_keep:]  # (B, T', C), T' = T or logits_to_keep
        B, T, C = x.shape
        # In 2D: a (B, 1, C) slice keeps its parent's strides, and on those PyTorch's
        # matmul copies the whole head per call (GPT-2 bf16: 90 ms instead of 2.5).
        logits = self.lm_head(x.reshape(B * T, C)).view(B, T, -1)  # (B, T', vocab)
        if self.logit_softcap is not None:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        if self.logits_scaling != 1:
            logits = logits / self.logits_scaling
        return logits
