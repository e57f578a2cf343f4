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
Compiling takes tens of seconds on a CPU the first time; inductor keeps the result on
disk, so a later load of the same model compiles in seconds.
Knows nothing of tokens, sampling or files. (gpt-fast `decode_one_token`.)
"""

import logging

import torch
from torch import nn

from pocketlm.models.cache import KVCache

log = logging.getLogger("pocketlm")

WARM_CALLS = 2  # calls with guards checked before they are skipped


class CompiledDecode:
    """`decode(tokens (B, 1), positions (B, 1), n_slots)` -> logits (B, 1, V), like
    `model(tokens, positions, cache, logits_to_keep=1)` with `n_slots` = positions + 1."""

    def __init__(self, model: nn.Module, cache: KVCache) -> None:
        if isinstance(cache, KVCache) and not cache.reserved:
            raise ValueError("a compiled decode step needs a reserved KV cache (reserve=True)")
        self.model, self.cache = model, cache
        self._slots = torch.arange(cache.max_seq_len, device=cache.device)
        self._graph = torch.compile(self._step, dynamic=False, fullgraph=True)
        self._calls = 0
        log.info(
            "compiling the decode step (about a minute the first time for a model, seconds "
            "once cached)"
        )

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor):  # noqa: ANN202
        """What is compiled: `slots` (n,) says by its length how many slots are visible."""
        self.cache.visible = slots.shape[0]
        logits = self.model(tokens, positions, self.cache, logits_to_keep=1)
        self.cache.visible = None
        return logits

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, n_slots: int) -> torch.Tensor:
        if n_slots < 2:  # a size-1 dimension would be specialised: not worth a graph
            return self.model(tokens, positions, self.cache, logits_to_keep=1)
        slots = self._slots[:n_slots]
        torch._dynamo.mark_dynamic(slots, 0)
        self._calls += 1
        try:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=self._calls > WARM_CALLS):
                return self._graph(tokens, positions, slots)
        except RuntimeError as error:
            if "skip_guard_eval_unsafe" not in str(error):
                raise
            self._calls = 0  # an input of a new kind: compile for it with the guards on
            return self(tokens, positions, n_slots)
