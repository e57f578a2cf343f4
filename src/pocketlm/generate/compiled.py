"""The one-token decode step compiled with torch.compile: the whole model as one generated
function, no Python per layer (`--compile`; measured on a CPU only, no GPU was at hand).

Eager decoding of a small model spends about as long in Python and PyTorch's dispatch as
in its kernels (SmolLM2-135M int4 on 2 cores: ~4.5 of ~9 ms per token, 274 module calls).
Compiled, the same kernels run from one generated function with the small ops fused
(measured: ~111 -> ~155 tok/s; ~0.7 ms per token still goes to dynamo's entry, guards
skipped or not). Three details make it pay:
- the KV cache is one tensor per layer (models/cache.py): a write into a slice of a
  shared tensor made the compiled step copy the whole cache, layer after layer; and it is
  reserved at the whole window, as the graph is specialised to its shape and, once guards
  are skipped, a cache that grew would be read as if it had not (so it must not grow);
- the number of slots a step may see is the length of a tensor marked dynamic, so one
  graph serves every position (as an int read off `positions` it would stop the graph,
  and as a plain int it would recompile at every token);
- once warm, guard evaluation is skipped (`skip_guard_eval_unsafe`): the step's inputs
  never change kind (a new kind raises, and is compiled for with the guards back on).
Compiling takes a minute or more on a CPU. Given a `store` folder, the step is compiled
ahead of time at its first call and kept there (generate.precompiled), so a later process
loads it in seconds instead of tracing the model again; without one it is compiled in
each process. Knows nothing of tokens or sampling. (gpt-fast `decode_one_token`.)
"""

import logging
import threading
from pathlib import Path

import torch
from torch import nn

from pocketlm.generate import precompiled
from pocketlm.models.cache import KVCache

log = logging.getLogger("pocketlm")

WARM_CALLS = 2  # calls with guards checked before they are skipped


class CompiledDecode:
    """`decode(tokens (B, 1), positions (B, 1), cache, n_slots)` -> logits (B, 1, V), like
    `model(tokens, positions, cache, logits_to_keep=1)` with `n_slots` = positions + 1.

    One per model, shared by every sequence that decodes with it: the cache is an input of
    the graph, not part of it, so a new sequence reuses the compiled code. Every cache it
    is given must be reserved at the same window (checked), so they all have the shapes
    the graph was made for. Calls are serialised: one graph, one caller at a time."""

    def __init__(self, model: nn.Module, *, store: Path | None = None) -> None:
        self.model = model
        self._graph = torch.compile(self._step, dynamic=False, fullgraph=True)
        # Kept on disk in `store` (generate.precompiled); made or loaded at the first call.
        self.store = None if store is None else Path(store)
        self.saved: list | None = None  # the steps from (and for) the store, once looked for
        self.loaded = False  # whether every step taken so far came from the store
        self._path: Path | None = None  # the file in the store, named for the model's key
        self._shape: tuple | None = None  # (rows, slots, dtype) of the caches it takes
        self._slots: torch.Tensor | None = None
        self.calls = 0
        self._lock = threading.Lock()
        log.info(
            "compiling the decode step (a minute or more the first time for a model, seconds "
            "once saved): it pays for long answers only"
        )

    @staticmethod
    def _step(model: nn.Module, tokens, positions, cache: KVCache, slots):  # noqa: ANN001, ANN205
        """What is compiled: `slots` (n,) says by its length how many slots are visible."""
        cache.visible = slots.shape[0]
        logits = model(tokens, positions, cache, logits_to_keep=1)
        cache.visible = None
        return logits

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, n_slots: int
    ) -> torch.Tensor:
        self._check(cache)
        if n_slots < 2:  # a size-1 dimension would be specialised: not worth a graph
            return self.model(tokens, positions, cache, logits_to_keep=1)
        with self._lock:
            slots = self._slots[:n_slots]
            self.calls += 1
            if self.store is not None:
                logits = self._call_saved(tokens, positions, cache, slots)
                if logits is not None:
                    return logits
            torch._dynamo.mark_dynamic(slots, 0)
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=self.calls > WARM_CALLS):
                    return self._graph(self.model, tokens, positions, cache, slots)
            except RuntimeError as error:
                if "skip_guard_eval_unsafe" not in str(error):
                    raise
                self.calls = 0  # an input of a new kind: compile for it with the guards on
        return self(tokens, positions, cache, n_slots)

    def _call_saved(self, tokens, positions, cache: KVCache, slots) -> torch.Tensor | None:  # noqa: ANN001
        """Decode through the steps kept in the store: loaded at the first call, and one
        compiled ahead of time (and saved with them) for each kind of input none of them
        takes -- with a sliding window, a step that sees more slots than the window is
        another graph. Their guards are checked once for each number of slots. None
        where a step cannot be compiled to keep: then torch.compile's own, lazily."""
        args = (self.model, tokens, positions, cache, slots)
        if self.saved is None:  # the first call: every cache has this one's shape
            self._path = precompiled.path_for(self.store, self.model, cache)
            with precompiled.inductor_files(self.store):  # the kernels load from there
                self.saved = precompiled.load(self._path)
            self.loaded = bool(self.saved)
        # The steps' guards decide which takes the call, at every call (~0.5 ms on SmolLM2
        # at load 7: a tree over its 60 cache tensors): the number of visible slots grows
        # by one a token, so no choice could be remembered by it.
        for step in self.saved:
            if precompiled.takes(step, args):
                return step(*args)
        if self.saved:
            log.info("compiling the decode step for another kind of input (%d slots)", len(slots))
        self.loaded = False
        example = slots[:]  # a view of its own, marked dynamic: calls pass `slots` bare
        torch._dynamo.mark_dynamic(example, 0)  # one graph for every position it can
        with precompiled.inductor_files(self.store):
            try:
                step = precompiled.compile_step(self._step, (*args[:-1], example))
            # PyTorch's ahead-of-time compile is experimental: whatever it cannot do (e.g.
            # pickle a module attribute it meets), the plain compile may still do.
            except Exception as error:  # noqa: BLE001
                log.warning("the decode step cannot be kept on disk (%s): compiling it "
                            "for this process only", error)  # fmt: skip
                self.store = None
                return None
            self.saved.insert(0, step)
            precompiled.save(self.saved, self._path)
            return step(*args)

    def _check(self, cache: KVCache) -> None:
        """Guards are skipped once warm: a cache of another shape would be read wrongly."""
        if not cache.reserved:
            raise ValueError("a compiled decode step needs a reserved KV cache (reserve=True)")
        shape = (cache.rows, cache.slots, cache.k[0].dtype, cache.device)
        if self._shape is None:
            self._shape = shape
            self._slots = torch.arange(cache.slots, device=cache.device)
        elif shape != self._shape:
            raise ValueError(f"this compiled step decodes caches of {self._shape}, not {shape}")
