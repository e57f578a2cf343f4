"""The KV cache: per layer one key and one value tensor, contiguous per row, grown in blocks.

Shapes: B = batch rows, H = key/value heads, S = slots, D = head dim. A sequence's token at
position p lives in slot p, so attention can mask by position alone and batched rows may
sit at different positions. One tensor per layer (not one for all layers) so that a
compiled decode step writes each in place: a write into a slice of one shared tensor makes
torch.compile copy the whole tensor per layer.

Memory follows the tokens held, not the window. The cache starts empty; a write past its
capacity reallocates every layer at a larger size and copies what it held: slots grow to
the next multiple of BLOCK, rows to the next power of two (so clients joining a server one
by one cost a few copies, not one each). `trim` gives memory back; `reserve` allocates the
whole window at once and freezes the shape, which a compiled decode step needs (its guards
are skipped once warm, so a tensor that changed shape under it would be read wrongly).
Rows share one slot capacity: a batch holds rows x the longest row's slots.

Why not a block table (vLLM's PagedAttention, Kwon et al. 2023): PyTorch's attention on a
CPU reads one strided (B, H, S, D) tensor, so pages would have to be gathered into one
every step, in every layer: a copy of every sequence's keys and values per token.
Measured (benchmarks/results/kv_memory-attention-20261129-2057.md: 2 threads, best of 12
interleaved rounds; ms per token, all layers, contiguous -> 16-token pages gathered):
SmolLM2-135M shapes, one row, 200 tokens 0.8 -> 4.7, 2000 tokens 4.4 -> 9.3, 16 rows of
2000 tokens 94 -> 295; GPT-2 small one row of 2000 tokens 2.1 -> 13.3, 16 rows 90 -> 1295.
A whole SmolLM2 decode step is ~21 ms, so pages would add up to as much again. A
contiguous row pays a copy when it grows instead: a SmolLM2 row holding 2048 tokens
grows in ~7-10 ms, once per BLOCK = 256 tokens (~0.03 ms a token; blocks of 64 cost
several times that, blocks of 512 leave twice the unused slots for little gain).
Knows nothing of models, tokens or sampling. (gpt-fast `KVCache.update`.)
"""

import torch

BLOCK = 256  # slots are allocated in multiples of this (see the module docstring)


class KVCache:
    """Keys and values of up to `batch_size` rows and `max_seq_len` slots, held in blocks."""

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
        reserve: bool = False,
    ) -> None:
        self.limits = (batch_size, max_seq_len)  # (rows, slots) it may grow to
        empty = (0, n_kv_heads, 0, head_dim)  # (B, H, S, D)
        self.k = [torch.zeros(empty, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(empty, dtype=dtype, device=device) for _ in range(n_layers)]
        self.rows, self.slots = 0, 0  # the capacity held now
        self.reserved = False  # True: allocated at the limits, and its shape never changes
        # How many slots this step's queries may see, when the caller knows it (a compiled
        # decode step, where reading it off `positions` would stop the graph); else None.
        self.visible: int | None = None
        if reserve:
            self.reserve()

    @property
    def max_seq_len(self) -> int:
        return self.limits[1]

    @property
    def batch_size(self) -> int:
        return self.limits[0]

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def nbytes(self) -> int:
        """Bytes of key and value storage held now (every layer)."""
        return sum(t.nbytes for t in (*self.k, *self.v))

    def update(
        self,
        layer: int,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        end: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) at `positions` (B, T); return this layer's (B, H, S, D)
        with S >= `end`, one past the furthest position (read off `positions` if not given;
        attention passes it, as it needs it too and reading it is an .item() per layer)."""
        batch = k.shape[0]
        if not self.reserved:  # a reserved cache is never resized: no check, no guard
            end = int(positions.max()) + 1 if end is None else end
            if batch > self.rows or end > self.slots:  # two int compares on the common path
                self.ensure(batch, end)
        k_cache, v_cache = self.k[layer], self.v[layer]
        if batch == 1:
            # One sequence (the common case): a plain index_copy along the slot axis.
            k_rows, v_rows = (k_cache, v_cache) if len(k_cache) == 1 else (k_cache[:1], v_cache[:1])
            k_rows.index_copy_(2, positions[0], k)
            v_rows.index_copy_(2, positions[0], v)
        else:
            rows = torch.arange(batch, device=k.device)[:, None]  # (B, 1)
            # Advanced indices around a slice put (B, T) first: (B, T, H, D).
            k_cache[rows, :, positions] = k.transpose(1, 2)
            v_cache[rows, :, positions] = v.transpose(1, 2)
        return k_cache[:batch], v_cache[:batch]

    def row(self, row: int) -> "RowView":
        """Row `row` seen as a one-row cache; it writes into this cache's storage as it is
        at the time of the write (the storage may have grown since the view was made)."""
        return RowView(self, row)

    def copy_row(self, source: int, target: int, n: int) -> None:
        """Copy row `source`'s first n slots into row `target`, in every layer."""
        self.ensure(max(source, target) + 1, n)
        for t in (*self.k, *self.v):
            t[target, :, :n] = t[source, :, :n]

    def ensure(self, rows: int, slots: int) -> None:
        """Hold at least `rows` rows and `slots` slots, growing in blocks if needed."""
        if rows <= self.rows and slots <= self.slots:
            return
        if rows > self.limits[0] or slots > self.limits[1]:
            raise ValueError(
                f"{rows} rows x {slots} slots exceed the cache's {self.limits[0]} x {self.limits[1]}"
            )
        assert not self.reserved, "a reserved KV cache is held at its limits and never grows"
        self._resize(
            max(self.rows, self._round_rows(rows)), max(self.slots, self._round_slots(slots))
        )

    def trim(self, rows: int, slots: int) -> None:
        """Keep rows [0, rows) and slots [0, slots) (their contents unchanged) and give back
        the rest; capacity becomes what growing to that size would give (`trim(0, 0)`:
        nothing held). A reserved cache keeps its storage, as a compiled step reads it."""
        if self.reserved:
            return
        rows, slots = (0, 0) if rows == 0 or slots == 0 else (rows, slots)
        new = (min(self.rows, self._round_rows(rows)), min(self.slots, self._round_slots(slots)))
        if new != (self.rows, self.slots):
            self._resize(*new)

    def reserve(self) -> None:
        """Allocate the whole window (every row, every slot) now; the shape never changes
        after, for a compiled decode step (growing raises, trimming keeps it)."""
        self.ensure(*self.limits)
        self.reserved = True

    def _round_rows(self, n: int) -> int:
        # Powers of two, at least 2 where allowed: a second client (or the n choices of
        # one request) does not cost a second copy of the whole cache.
        return 0 if n == 0 else min(self.limits[0], max(2, 1 << (n - 1).bit_length()))

    def _round_slots(self, n: int) -> int:
        return min(self.limits[1], -(-n // BLOCK) * BLOCK)

    def _resize(self, rows: int, slots: int) -> None:
        """New storage of (rows, slots) for every layer, holding what fits of the old."""
        if rows == 0 or slots == 0:
            rows = slots = 0
        keep_rows, keep_slots = min(rows, self.rows), min(slots, self.slots)
        # Growth happens mid-forward, usually under inference_mode; tensors made there could
        # never again be written outside it (a row copied by the scheduler, a no_grad test).
        with torch.inference_mode(False), torch.no_grad():
            self._reallocate(rows, slots, keep_rows, keep_slots)
        self.rows, self.slots = rows, slots

    def _reallocate(self, rows: int, slots: int, keep_rows: int, keep_slots: int) -> None:
        for tensors in (self.k, self.v):
            for i, old in enumerate(tensors):
                _, H, _, D = old.shape
                # Zeros, not empty: padding slots are read under the mask, and 0 x NaN left
                # over in fresh memory would still poison the weighted sum.
                new = old.new_zeros((rows, H, slots, D))  # (B, H, S, D)
                new[:keep_rows, :, :keep_slots] = old[:keep_rows, :, :keep_slots]
                tensors[i] = new  # the old one is freed here, so growth holds one layer twice


class RowView:
    """One row of a KVCache as a one-row cache (a prefill into a server's row). It keeps
    no storage of its own: each write goes through the parent, which may grow first."""

    def __init__(self, parent: KVCache, row: int) -> None:
        self.parent, self.index = parent, row
        self.visible: int | None = None

    @property
    def k(self) -> list[torch.Tensor]:
        return [k[self.index : self.index + 1] for k in self.parent.k]

    @property
    def v(self) -> list[torch.Tensor]:
        return [v[self.index : self.index + 1] for v in self.parent.v]

    @property
    def max_seq_len(self) -> int:
        return self.parent.max_seq_len

    @property
    def batch_size(self) -> int:
        return 1

    @property
    def device(self) -> torch.device:
        return self.parent.device

    def update(
        self,
        layer: int,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        end: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As KVCache.update, for k, v of one row (1, H, T, D)."""
        if k.shape[0] != 1:
            raise ValueError(f"a row view takes one row, got {k.shape[0]}")
        parent, i = self.parent, self.index
        if not parent.reserved:
            parent.ensure(i + 1, int(positions.max()) + 1 if end is None else end)
        k_row, v_row = parent.k[layer][i : i + 1], parent.v[layer][i : i + 1]  # (1, H, S, D)
        k_row.index_copy_(2, positions[0], k)
        v_row.index_copy_(2, positions[0], v)
        return k_row, v_row
