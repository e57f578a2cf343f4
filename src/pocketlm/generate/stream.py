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

from pocketlm.generate.sequence import Sequence
from pocketlm.generate.stops import StopMatcher
from pocketlm.sampling import SamplingParams, make_generator, process_logits, prompt_mask, sample
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
