"""A sequence's KV cache and the token ids in it.

`Sequence.prefill` computes only what the cache does not already hold (so a chat turn pays
for its new tokens only), `step` appends one token. When the context window is full it
keeps the most recent tokens and rebuilds the cache (a sliding window). A LongRoPE model
(Phi-3) rotates with other frequencies once a sequence passes its switch length, so the
cache is rebuilt from the first token when the sequence crosses it, as transformers'
Phi-3 generation does. Knows nothing of sampling, text or HTTP. (gpt-fast
`prefill`/`decode_one_token`.)
"""

from collections.abc import Sequence as Seq

import torch
from torch import nn

from pocketlm.generate.compiled import WARM_CALLS, CompiledDecode
from pocketlm.models import make_cache


class Sequence:
    """One sequence's KV cache and the token ids it holds."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_seq_len: int | None = None,
        keep_fraction: float = 0.75,
        decode: CompiledDecode | None = None,
    ) -> None:
        self.model = model
        self.context_length = min(
            max_seq_len or model.config.context_length, model.config.context_length
        )
        # After the window fills, this many recent tokens are kept and re-prefilled.
        self.keep = max(1, int(self.context_length * keep_fraction))
        # The cache grows with the tokens, except under a compiled step: that one is
        # specialised to the cache's shape, so the whole window is reserved up front.
        self.cache = make_cache(
            model, batch_size=1, max_seq_len=self.context_length, reserve=decode is not None
        )
        self.device = self.cache.device
        # Preallocated inputs of a decode step: the token, and every position's index.
        self._token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self._positions = torch.arange(self.context_length, device=self.device)[None]  # (1, S)
        # Decode steps through torch.compile (pocketlm.generate.compiled); prefills stay eager.
        self._decode = decode
        self.tokens: list[int] = []
        self.rebuilds = 0  # how many times the window slid (for tests and stats)
        # LongRoPE: past this many tokens the model rotates with its long factors.
        self._switch: int | None = getattr(model.config, "rope_switch_length", None)
        self._long = False  # whether the cache holds keys rotated with the long factors

    def warm_up(self) -> None:
        """Take a few decode steps on scratch tokens, so that compiling (tens of seconds
        the first time) happens now, not in the middle of the first answer or its timing.
        Their cache slots are overwritten by the next prefill."""
        if self.context_length > 5:
            self.prefill([0, 0])
            for _ in range(WARM_CALLS + 1):  # the last one with guards skipped
                self.step(0)
            self.truncate(0)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def prefill(self, ids: Seq[int]) -> torch.Tensor:
        """Make the cache hold exactly `ids` (at most the context length); return the last
        position's logits (V,). Only the part after the common prefix is computed."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        if len(ids) > self.context_length:
            raise ValueError(f"{len(ids)} tokens exceed the context length {self.context_length}")
        reuse = reusable_prefix(self.tokens, ids)
        self.tokens = list(ids[:reuse])
        return self._forward(list(ids[reuse:]))

    def step(self, token: int) -> torch.Tensor:
        """Append one token; return the next-token logits (V,)."""
        if len(self.tokens) >= self.context_length:
            kept = self.tokens[-self.keep + 1 :] + [token]
            self.tokens = []
            self.rebuilds += 1
            return self._forward(kept)
        self._token[0, 0] = token  # no tensor is allocated per decode step
        return self._run(self._token, [token], last_only=True)[-1]

    def extend(self, ids: Seq[int]) -> torch.Tensor:
        """Append `ids` (they must fit in the window); return the logits after each (T, V).
        A speculative verifier reads them all, then `truncate`s what it rejects."""
        if len(self.tokens) + len(ids) > self.context_length:
            raise ValueError(
                f"{len(ids)} more tokens exceed the context length {self.context_length}"
            )
        return self._run(torch.tensor([list(ids)], device=self.device), list(ids))

    def truncate(self, n: int) -> None:
        """Forget all but the first `n` tokens (their cache slots are simply overwritten later)."""
        del self.tokens[n:]

    @property
    def last_prefill_size(self) -> int:
        return self._last_size

    def _forward(self, new: list[int]) -> torch.Tensor:
        return self._run(torch.tensor([new], device=self.device), new, last_only=True)[-1]

    def _run(
        self, tokens: torch.Tensor, new: list[int], *, last_only: bool = False
    ) -> torch.Tensor:
        """Run `tokens` (1, T) at the next positions; the logits of every position (T, V),
        or of the last one only (1, V)."""
        start = len(self.tokens)
        if self._switch is not None:
            long = start + len(new) > self._switch
            if start and long != self._long:
                # The cache was rotated with the other LongRoPE factors: recompute it all
                # (transformers' Phi3ForCausalLM.prepare_inputs_for_generation drops it).
                n, new = len(new), [*self.tokens, *new]
                self.tokens, start = [], 0
                logits = self._run(torch.tensor([new], device=self.device), new,
                                   last_only=last_only)  # fmt: skip
                return logits if last_only else logits[-n:]
            self._long = long
        positions = self._positions[:, start : start + len(new)]  # (1, T), a view
        with torch.inference_mode():
            if self._decode is not None and len(new) == 1:  # a decode step
                logits = self._decode(tokens, positions, self.cache, start + 1)
            else:
                keep = 1 if last_only else 0
                logits = self.model(tokens, positions, self.cache, logits_to_keep=keep)
        self.tokens.extend(new)
        self._last_size = len(new)
        return logits[0].float()  # (T or 1, V)


def reusable_prefix(held: Seq[int], ids: Seq[int]) -> int:
    """How many of prompt `ids`' first tokens a cache holding `held` can keep: their
    common prefix, less the prompt's last token, which is always computed again for its
    logits. (A session's own cache here; the server's prefix cache, serve/prefix_cache.py.)"""
    n = 0
    for x, y in zip(held, ids, strict=False):
        if x != y:
            break
        n += 1
    return min(n, len(ids) - 1)
