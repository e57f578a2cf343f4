"""The KV cache: one preallocated key and value tensor per layer, written in place.

Shapes: B = batch, H = key/value heads, S = slots (max sequence length), D = head dim.
A sequence's token at position p lives in slot p, so attention can mask by position
alone and batched rows may sit at different positions. One tensor per layer (not one
for all layers) so that a compiled decode step writes each in place: a write into a
slice of one shared tensor makes torch.compile copy the whole tensor per layer.
Knows nothing of models, tokens or sampling. (gpt-fast `KVCache.update`.)
"""

import torch


class KVCache:
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
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, H, S, D)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        # How many slots this step's queries may see, when the caller knows it (a compiled
        # decode step, where reading it off `positions` would stop the graph); else None.
        self.visible: int | None = None

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def update(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) at `positions` (B, T); return this layer's (B, H, S, D)."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        if k.shape[0] == 1:
            # One sequence (the common case): a plain index_copy along the slot axis.
            k_rows, v_rows = (k_cache, v_cache) if len(k_cache) == 1 else (k_cache[:1], v_cache[:1])
            k_rows.index_copy_(2, positions[0], k)
            v_rows.index_copy_(2, positions[0], v)
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
            # Advanced indices around a slice put (B, T) first: (B, T, H, D).
            k_cache[rows, :, positions] = k.transpose(1, 2)
            v_cache[rows, :, positions] = v.transpose(1, 2)
        return k_cache[: k.shape[0]], v_cache[: k.shape[0]]

    def row(self, row: int) -> "KVCache":
        """Row `row` seen as a one-row cache that shares this one's storage."""
        view = object.__new__(KVCache)
        view.k = [k[row : row + 1] for k in self.k]
        view.v = [v[row : row + 1] for v in self.v]
        view.visible = None
        return view

    def copy_row(self, source: int, target: int, n: int) -> None:
        """Copy row `source`'s first n slots into row `target`, in every layer."""
        for t in (*self.k, *self.v):
            t[target, :, :n] = t[source, :, :n]
