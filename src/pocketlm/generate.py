"""Generation, in layers: a sequence's cache -> a token iterator -> a text iterator.

`Sequence` owns one KV cache and the tokens in it: `prefill` computes only what the cache
does not already hold (so a chat turn pays for its new tokens only), `step` appends one
token. When the context window is full it keeps the most recent tokens and rebuilds the
cache (a sliding window). `generate_tokens` samples; `stream_text` turns tokens into
text pieces with stop sequences and a finish reason. Knows nothing of HTTP or terminals.
(gpt-fast `prefill`/`decode_one_token`, mlx-lm `generate_step` -> `stream_generate`.)
"""

import time
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from torch import nn

from pocketlm.compiled import WARM_CALLS, CompiledDecode
from pocketlm.models import make_cache
from pocketlm.sampling import SamplingParams, make_generator, process_logits, prompt_mask, sample
from pocketlm.stopping import StopMatcher
from pocketlm.tokenizer import Tokenizer


@dataclass
class Step:
    """One generated token and how sure the model was of it."""

    token: int
    logprob: float  # log-probability under the model (before sampling filters)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, token: int, *, top_logprobs: int = 0) -> "Step":
        """The step for `token` drawn from raw `logits` (V,), with the k best alternatives."""
        logprobs = torch.log_softmax(logits, dim=-1)
        step = cls(token, float(logprobs[token]))
        if top_logprobs:
            values, ids = logprobs.topk(top_logprobs)
            step.top_logprobs = list(zip(ids.tolist(), values.tolist(), strict=True))
        return step


@dataclass
class Chunk:
    """A piece of streamed text; the last chunk carries the finish reason."""

    text: str
    token: int | None = None
    logprob: float | None = None
    finish_reason: str | None = None  # "stop" (EOS or stop sequence) or "length"
    top_logprobs: list[tuple[int, float]] = field(
        default_factory=list
    )  # (id, logprob) alternatives


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually computed (the rest came from the cache)
    time_to_first_token: float = 0.0
    decode_seconds: float = 0.0
    draft_proposed: int = 0  # speculative decoding: tokens the draft proposed
    draft_accepted: int = 0  # ... and how many of them the target kept

    def record_token(self, started: float) -> None:
        """Count one more generated token; `started` is when the prefill began."""
        elapsed = time.perf_counter() - started
        if self.new_tokens == 0:
            self.time_to_first_token = elapsed  # the first token comes out of the prefill
        else:
            self.decode_seconds = elapsed - self.time_to_first_token
        self.new_tokens += 1

    @property
    def tokens_per_second(self) -> float:
        # The first token comes out of the prefill; the rest are decode steps.
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


class Sequence:
    """One sequence's KV cache and the token ids it holds."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_seq_len: int | None = None,
        keep_fraction: float = 0.75,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.context_length = min(
            max_seq_len or model.config.context_length, model.config.context_length
        )
        # After the window fills, this many recent tokens are kept and re-prefilled.
        self.keep = max(1, int(self.context_length * keep_fraction))
        self.cache = make_cache(model, batch_size=1, max_seq_len=self.context_length)
        self.device = self.cache.device
        # Preallocated inputs of a decode step: the token, and every position's index.
        self._token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        self._positions = torch.arange(self.context_length, device=self.device)[None]  # (1, S)
        # Decode steps through torch.compile (pocketlm.compiled); prefills stay eager.
        self._compiled = CompiledDecode(model, self.cache) if compile else None
        self.tokens: list[int] = []
        self.rebuilds = 0  # how many times the window slid (for tests and stats)
        if compile:
            self._compile_now()

    def _compile_now(self) -> None:
        """Take a few compiled steps on scratch tokens, so that compiling (tens of seconds
        the first time) happens now, not in the middle of the first answer or its timing.
        Their cache slots are overwritten by the next prefill."""
        if self.context_length > 5:
            self.prefill([0, 0])
            for _ in range(WARM_CALLS + 1):  # the last one with guards skipped
                self.step(0)
            self.truncate(0)

    def prefill(self, ids: Seq[int]) -> torch.Tensor:
        """Make the cache hold exactly `ids` (at most the context length); return the last
        position's logits (V,). Only the part after the common prefix is computed."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        if len(ids) > self.context_length:
            raise ValueError(f"{len(ids)} tokens exceed the context length {self.context_length}")
        reuse = _common_prefix(self.tokens, ids)
        if reuse == len(ids):
            reuse -= 1  # recompute the last token to get its logits
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
        positions = self._positions[:, start : start + len(new)]  # (1, T), a view
        with torch.inference_mode():
            if self._compiled is not None and len(new) == 1:  # a decode step
                logits = self._compiled(tokens, positions, start + 1)
            else:
                keep = 1 if last_only else 0
                logits = self.model(tokens, positions, self.cache, logits_to_keep=keep)
        self.tokens.extend(new)
        self._last_size = len(new)
        return logits[0].float()  # (T or 1, V)


def _common_prefix(a: Seq[int], b: Seq[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def generate_tokens(
    seq: Sequence,
    prompt_ids: Seq[int],
    *,
    params: SamplingParams,
    max_tokens: int,
    eos_ids: Iterable[int] = (),
    top_logprobs: int = 0,
    stats: Stats | None = None,
) -> Iterator[Step]:
    """Prefill the prompt, then sample up to `max_tokens` tokens, stopping after an EOS."""
    stats = stats if stats is not None else Stats()
    stats.prompt_tokens = len(prompt_ids)
    eos = frozenset(eos_ids)
    generator = make_generator(params.seed, seq.device)
    counts = torch.zeros(seq.model.config.vocab_size, device=seq.device)
    started = time.perf_counter()
    logits = seq.prefill(prompt_ids)
    stats.prefilled_tokens = seq.last_prefill_size
    seen_in_prompt = prompt_mask(params, prompt_ids, vocab_size=len(counts), device=seq.device)
    for i in range(max_tokens):
        filtered = process_logits(logits, params, counts=counts, prompt_mask=seen_in_prompt)
        token = int(sample(filtered, params, generator=generator))
        step = Step.from_logits(logits, token, top_logprobs=top_logprobs)
        stats.record_token(started)
        yield step
        if token in eos or i == max_tokens - 1:
            return
        counts[token] += 1
        logits = seq.step(token)


def stream_text(
    steps: Iterable[Step], tokenizer: Tokenizer, *, stop: Seq[str] = ()
) -> Iterator[Chunk]:
    """Text pieces from tokens: never broken UTF-8, stop strings matched across token
    boundaries and left out, end-of-text not shown. The last chunk has the finish reason."""
    decoder, matcher = tokenizer.stream_decoder(), StopMatcher(stop)
    finish = "length"
    for step in steps:
        if step.token in tokenizer.eos_ids:
            finish = "stop"
            break
        text, stopped = matcher.feed(decoder.feed(step.token))
        if stopped:
            yield Chunk(
                text, step.token, step.logprob, finish_reason="stop", top_logprobs=step.top_logprobs
            )
            return
        yield Chunk(text, step.token, step.logprob, top_logprobs=step.top_logprobs)
    text, stopped = matcher.feed(decoder.flush())
    yield Chunk(
        text if stopped else text + matcher.flush(), finish_reason="stop" if stopped else finish
    )
