"""The server's prompt cache: keys and values of prompts seen before, shared across
requests, so that a request which starts like an earlier one -- the same system prompt or
tool list, or a chat's previous turns and the answer they got -- copies that part into its
cache row and prefills only the rest.

Prefixes are held in blocks of BLOCK tokens. A block is keyed by its tokens and by the block
before it, so it stands for the whole prefix up to its end (a chain, as vLLM's automatic
prefix caching hashes its blocks; the key is exact, no hash is trusted), and holds that
block's keys and values in every layer. A sequence's tail (fewer than BLOCK tokens) is held
too, as a partial block keyed the same way; it never has a block after it, and serves only
a prompt that ends where it does. A lookup walks the prompt's blocks down the chain;
the matched blocks' KV is copied into the request's row. The engine's rows are contiguous
(models/cache.py measures why not a block table), so the store keeps copies of its own and
a hit costs one copy of the prefix -- milliseconds, against seconds to compute it on a CPU.
The prompt's last token is always computed again, for its logits, as a chat `Session` does
in its own cache (generate.sequence.reusable_prefix). A block once held is never replaced
(the first stored wins): a storing request only touches the blocks it finds.

Exactness: the scheduler computes a prompt's last token in a call of its own whenever this
cache is on, cold or warm. A prompt sent again is then held whole (its tail too): every slot
it loads is the slot its first run left, and its last token is computed by the same call on
the same KV, so it gets the very same logits -- the same tokens for the same seed, on a
quantized model too. A prompt that extends a held one (a chat's next turn) computes its rest
in another split than a cold run would; on a quantized model, whose kernels round
differently with the rows a product takes, its logits may then differ in the low bits (fp32
agrees to ~1e-5; llama.cpp documents the same of its cache_prompt). `--cache-ram 0` turns
the cache off.

Memory: the blocks are held under a budget in bytes (`pocketlm serve --cache-ram`) and
evicted least recently used first. A lookup or a store touches a chain from its last block
to its first, so a block is always more recent than the blocks after it, and the least
recently used block is always one that no held block follows (a leaf).

Adapters: a LoRA adapter (serve/adapters.py) changes the keys and values of every token, so
the chains of each adapter, and of the base alone, start from roots of their own: a prompt
never reuses the KV another adapter computed.

Which models: a token's keys and values depend only on the tokens before it and on its
position. Sliding-window models (Mistral, Gemma 2/3, GPT-OSS) keep every slot (the window is
a mask over positions), so a cached prefix is exact for them too. LongRoPE (Phi-3) rotates a
sequence longer than its switch length with other frequencies: only prefixes of sequences
within it are stored, and only prompts within it reuse them. The KV a hit copies is what
the request would compute up to rounding (a matrix product's sums depend on how many rows
it takes, as with the scheduler's chunked prefill) and exactly what the first run of the
same prompt computed: docs/prefix_cache.md measures it.
Knows nothing of sampling, batching or HTTP. (vLLM's automatic prefix caching; SGLang's
RadixAttention, Zheng et al. 2024; mlx-lm's LRUPromptCache; llama.cpp's --cache-ram.)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from pocketlm.generate.sequence import reusable_prefix
from pocketlm.models.cache import KVCache

BLOCK = 16  # tokens a block holds: a hit reuses whole blocks, so < 16 held ones are recomputed
DEFAULT_BUDGET = 1 << 30  # bytes (1 GiB): SmolLM2-135M's fp32 KV of ~23k tokens, an 8B's bf16 ~8k


class _Block:
    """One block of a held prefix: its key, the block before it, and its KV (2L, H, BLOCK, D):
    the L layers' keys, then their values."""

    __slots__ = ("key", "id", "parent", "children", "kv")

    def __init__(self, key: tuple, id: int, parent: _Block | None, kv: torch.Tensor) -> None:
        self.key, self.id, self.parent, self.kv = key, id, parent, kv
        self.children = 0  # held blocks that follow this one


class PrefixCache:
    """Prompt prefixes' KV in blocks, least recently used evicted first under `budget` bytes."""

    def __init__(self, *, budget: int, block: int = BLOCK, switch: int | None = None) -> None:
        self.budget, self.block = budget, block
        # LongRoPE's switch length: sequences longer than it rotate with other frequencies.
        self.switch = switch
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()  # least recently used first
        self._ids = 0  # the last block id given out (never reused, so a key never goes stale)
        self.bytes = 0
        self.counters = dict.fromkeys(("hits", "misses", "reused_tokens", "evicted_blocks"), 0)

    def stats(self) -> dict[str, int]:
        """Counters and gauges for /metrics (keys prefixed `prefix_cache_`)."""
        held = {"bytes": self.bytes, "blocks": len(self._blocks)}
        return {f"prefix_cache_{k}": v for k, v in {**self.counters, **held}.items()}

    def load(self, ids: Sequence[int], cache: KVCache, row: int, *, adapter: int = 0) -> int:
        """Copy the longest held prefix of prompt `ids` (run with LoRA adapter number
        `adapter`; 0: none) into cache row `row`; return how many tokens it covers (0: none
        held; never the whole prompt, whose last token is computed for its logits: a prompt
        held whole reuses all but its last token)."""
        # A prompt past LongRoPE's switch is rotated with its long factors, the held
        # prefixes with its short ones: nothing held is of use to it.
        long = self.switch is not None and len(ids) > self.switch
        chain = [] if long else self._chain(ids, adapter)
        # as a Session reuses its own cache: all but the last token, computed for its logits
        n = reusable_prefix(ids[: _tokens(chain)], ids)
        if n == 0:
            self.counters["misses"] += 1
            return 0
        self.counters["hits"] += 1
        self.counters["reused_tokens"] += n
        self._touch(chain)
        kv = torch.cat([b.kv for b in chain], dim=2)[:, :, :n]  # (2L, H, n, D)
        cache.ensure(row + 1, n)
        layers = len(cache.k)
        for i, (k, v) in enumerate(zip(cache.k, cache.v, strict=True)):
            k[row, :, :n] = kv[i]
            v[row, :, :n] = kv[layers + i]
        return n

    def store(self, ids: Sequence[int], cache: KVCache, row: int, *, adapter: int = 0) -> None:
        """Hold the KV of `ids` (the tokens cache row `row` holds, from slot 0): its whole
        blocks and its tail (a partial block, a leaf); the blocks already held are only
        touched, never replaced (the first stored wins, so a prompt sent again finds the KV
        its first run loaded or computed). What would not fit in the budget beside this
        prefix is not stored."""
        if self.switch is not None and len(ids) > self.switch:
            return  # rotated with LongRoPE's long factors (see the module docstring)
        chain = self._chain(ids, adapter)
        start = _tokens(chain)
        per_token = _block_bytes(cache, 1)
        # the blocks to add, (first, end) slots, as far as the whole prefix fits the budget
        spans = [(a, min(a + self.block, len(ids))) for a in range(start, len(ids), self.block)]
        spans = [(a, b) for a, b in spans if b * per_token <= self.budget]
        if spans:
            end = spans[-1][1]
            self._touch(chain)  # so that making room evicts other prefixes first
            self._evict(self.budget - (end - start) * per_token, keep={b.id for b in chain})
            kv = torch.stack([t[row, :, start:end] for t in (*cache.k, *cache.v)])  # (2L, H, T, D)
            parent = chain[-1] if chain else None
            for a, b in spans:
                # a copy of its own, so that evicting the block frees its memory
                block = kv[:, :, a - start : b - start].clone()  # (2L, H, <= BLOCK, D)
                parent = self._add(tuple(ids[a:b]), parent, block, root=-adapter)
                chain.append(parent)
        self._touch(chain)

    def _chain(self, ids: Sequence[int], adapter: int) -> list[_Block]:
        """The held blocks that spell `ids`' start, first first: whole blocks, and the
        prompt's tail when it is held as a partial block (a held partial block is of use
        only to a prompt that ends exactly there)."""
        chain: list[_Block] = []
        for a in range(0, len(ids), self.block):
            parent = chain[-1].id if chain else -adapter  # see _add
            block = self._blocks.get((parent, tuple(ids[a : a + self.block])))
            if block is None:
                break
            chain.append(block)
        return chain

    def _add(self, tokens: tuple, parent: _Block | None, kv: torch.Tensor, *, root: int) -> _Block:
        # A first block's key starts with its root, -adapter (0: the base alone), and every
        # other block's with its parent's id (from 1 up): the chains of two adapters never meet.
        self._ids += 1
        block = _Block((parent.id if parent else root, tokens), self._ids, parent, kv)
        self._blocks[block.key] = block
        self.bytes += kv.nbytes
        if parent is not None:
            parent.children += 1
        return block

    def _touch(self, chain: list[_Block]) -> None:
        # Last block first: each block ends up more recent than the ones after it.
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)

    def _evict(self, limit: int, *, keep: set[int]) -> None:
        """Drop least recently used leaves (none in `keep`) until at most `limit` bytes are held."""
        while self.bytes > limit:
            victim = next(
                (b for b in self._blocks.values() if not b.children and b.id not in keep), None
            )
            if victim is None:
                return
            del self._blocks[victim.key]
            self.bytes -= victim.kv.nbytes
            if victim.parent is not None:
                victim.parent.children -= 1
            self.counters["evicted_blocks"] += 1


def _tokens(chain: list[_Block]) -> int:
    """Tokens a chain of blocks spells (its last one may be partial)."""
    return sum(len(b.key[1]) for b in chain)


def _block_bytes(cache: KVCache, block: int) -> int:
    """Bytes one block of `block` tokens takes: keys and values of every layer."""
    _, heads, _, dim = cache.k[0].shape
    return 2 * len(cache.k) * heads * block * dim * cache.k[0].element_size()


def make_prefix_cache(
    cache: object, *, budget: int, switch: int | None = None
) -> PrefixCache | None:
    """A prefix cache for a scheduler's `cache`, or None: when `budget` is 0 (turned off) or
    the cache is not the engine's KVCache (a model running through transformers keeps its own)."""
    if budget <= 0 or not isinstance(cache, KVCache):
        return None
    return PrefixCache(budget=budget, switch=switch)
