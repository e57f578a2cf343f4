"""One request's state on its way through the engine: logits -> `Step` -> `Chunk`.

Two small objects, used by every entry point -- single-sequence generation (and so chat
and few-shot), speculative decoding and the server's batched scheduler -- so a request
gives the same tokens and text whichever way it runs:
  - `Sampler`: the sampling parameters, the request's own random generator (seeded, or
    from os.urandom: never a stream another request also draws from), the penalty counts,
    the prompt mask and, for a constrained request, its grammar state (whose mask comes
    first, before bias, penalties, temperature and filters); `step(logits)` picks the next
    token and reports it as a `Step` (log-probabilities only when the request asked for
    them; `final` once the grammar is complete).
  - `TextStream`: the streaming detokenizer, the stop-string matcher and end-of-text;
    `feed(step)` gives the `Chunk` of text that token adds, with the finish reason on the
    chunk that ends the request.
Knows nothing of models, caches, batching or HTTP. (mlx-lm `generate_step` /
`stream_generate`; vLLM's per-request `SamplingParams` + detokenizer.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pocketlm.generate.constraint import GrammarState
from pocketlm.generate.params import GenerationParams
from pocketlm.generate.stops import StopMatcher
from pocketlm.sampling import make_generator, process_logits, prompt_mask, sample
from pocketlm.tokenizer import Tokenizer


@dataclass
class Step:
    """One generated token and, when asked for, how sure the model was of it."""

    token: int
    logprob: float | None = None  # log-probability under the model (before sampling filters)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob)
    final: bool = False  # the request's grammar is complete: only end-of-text may follow


@dataclass
class Stats:
    """What one generation cost; it comes back on the last chunk and on the Completion."""

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


@dataclass
class Chunk:
    """A piece of streamed text and the token that added it; the last chunk carries the
    finish reason ("stop": end-of-text or a stop string, "length": max_tokens) and, from
    a session, the statistics."""

    text: str
    token: int | None = None  # None on a chunk that only flushes text (after end-of-text)
    logprob: float | None = None
    finish_reason: str | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    stats: Stats | None = None


def fresh_seed() -> int:
    """A seed for a request that gave none: its own random stream, from the OS."""
    return int.from_bytes(os.urandom(8), "little")


class Sampler:
    """One request's sampling state: turns each step's logits (V,) into a `Step`."""

    def __init__(
        self,
        params: GenerationParams,
        prompt_ids: Sequence[int],
        *,
        vocab_size: int,
        device: torch.device | str,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.params = params.sampling
        self.logprobs = params.logprobs
        seed = self.params.seed if self.params.seed is not None else fresh_seed()
        self.generator = make_generator(seed, device)
        self.counts = torch.zeros(vocab_size, device=device)  # times each token was generated
        self.prompt_mask = prompt_mask(
            self.params, prompt_ids, vocab_size=vocab_size, device=device
        )
        self.grammar: GrammarState | None = None
        if params.grammar is not None:
            if tokenizer is None:
                raise ValueError("a constrained request needs the tokenizer")
            self.grammar = params.grammar.bind(tokenizer, vocab_size=vocab_size).start()

    def filter(self, logits: torch.Tensor, *, counts: torch.Tensor | None = None) -> torch.Tensor:
        """The logits after the grammar's mask, bias, penalties, temperature and the
        filters (`counts`: other counts than this request's, for a speculative draft
        looking ahead; the grammar is where its state stands)."""
        counts = self.counts if counts is None else counts
        if self.grammar is not None:
            logits = self.grammar.apply(logits)
        return process_logits(logits, self.params, counts=counts, prompt_mask=self.prompt_mask)

    def draw(self, filtered: torch.Tensor) -> int:
        """One token from filtered logits, with this request's generator."""
        return int(sample(filtered, self.params, generator=self.generator))

    def step(self, logits: torch.Tensor) -> Step:
        """Pick the next token from raw `logits` (V,), count it, and describe it."""
        token = self.draw(self.filter(logits))
        self.accept(token)
        return self.describe(logits, token)

    def accept(self, token: int) -> None:
        """Count `token` as generated (for the penalties) and move the grammar past it."""
        self.counts[token] += 1
        if self.grammar is not None:
            self.grammar.accept(token)

    def describe(self, logits: torch.Tensor, token: int) -> Step:
        """The step for `token` drawn from raw `logits`, with the log-probabilities the
        request asked for."""
        step = Step(token, final=self.grammar is not None and self.grammar.done)
        if self.logprobs is not None:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            step.logprob = float(logprobs[token])
            if self.logprobs:
                values, ids = logprobs.topk(self.logprobs)
                step.top_logprobs = list(zip(ids.tolist(), values.tolist(), strict=True))
        return step


class TextStream:
    """Tokens -> text pieces: never broken UTF-8, stop strings matched across token
    boundaries and left out, end-of-text not shown."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.decoder = tokenizer.stream_decoder()
        self.matcher = StopMatcher(stop)
        self.eos_ids = tokenizer.eos_ids

    def feed(self, step: Step, *, last: bool = False) -> Chunk:
        """The chunk `step`'s token adds; its finish reason is set when the request ends
        here: at end-of-text (the token is not part of the text), a stop string, or
        `last` (the max_tokens-th token) or `step.final` (the grammar is complete)."""
        if step.token in self.eos_ids:
            return self.finish("stop")
        text, stopped = self.matcher.feed(self.decoder.feed(step.token))
        chunk = Chunk(text, step.token, step.logprob, top_logprobs=step.top_logprobs)
        if stopped:
            chunk.finish_reason = "stop"
        elif last or step.final:
            end = self.finish("stop" if step.final else "length")
            chunk.text, chunk.finish_reason = chunk.text + end.text, end.finish_reason
        return chunk

    def finish(self, reason: str) -> Chunk:
        """The last chunk: the text still held back (unless a stop string matched)."""
        tail, stopped = self.matcher.feed(self.decoder.flush())
        text = tail if stopped else tail + self.matcher.flush()
        return Chunk(text, finish_reason="stop" if stopped else reason)
