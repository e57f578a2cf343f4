"""The KV cache: one preallocated tensor pair for all layers, written in place.

Shapes: L = layers, B = batch, H = key/value heads, S = slots (max sequence length),
D = head dim. A sequence's token at position p lives in slot p, so attention can mask
by position alone and batched rows may sit at different positions.
Knows nothing of models, tokens or sampling. (gpt-fast `KVCache.update`.)
"""

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        shape = (n_layers, batch_size, n_kv_heads, max_seq_len, head_dim)  # (L, B, H, S, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) at `positions` (B, T); return this layer's (B, H, S, D)."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        if k.shape[0] == 1:
            # One sequence (the common case): a plain index_copy along the slot axis.
            k_cache[:1].index_copy_(2, positions[0], k)
            v_cache[:1].index_copy_(2, positions[0], v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
            # Advanced indices around a slice put (B, T) first: (B, T, H, D).
            k_cache[rows, :, positions] = k.transpose(1, 2)
            v_cache[rows, :, positions] = v.transpose(1, 2)
        return k_cache[: k.shape[0]], v_cache[: k.shape[0]]
