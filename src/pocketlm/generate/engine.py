"""A model ready to generate (`Engine`) and the KV caches its callers hold (`Session`).

`Engine` holds what every generation shares: the model, its tokenizer, the context window,
and -- set as explicit steps after loading -- a draft model for speculative decoding and a
compiled decode step. It keeps no cache and no statistics of its own, so any number of
streams may run from it, interleaved or from several threads: `engine.stream(...)` opens a
fresh session each time.

`Session` is one KV cache that a caller holds on purpose: each prompt reuses the part of
the cache it shares with the text already there, so a chat's next turn only computes its
new tokens. It generates one text at a time; a second stream started while one is still
open is refused with a clear error, never silently mixed into the same cache.

Options are checked when `stream` is called, not at the first token; the statistics come
back on the last chunk and on the `Completion`. Knows nothing of HTTP or terminals.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from torch import nn

from pocketlm.errors import PocketLMError
from pocketlm.generate import CONTEXT, LOOKAHEAD
from pocketlm.generate.compiled import CompiledDecode
from pocketlm.generate.params import GenerationParams
from pocketlm.generate.request import Chunk, Stats, Step, TextStream
from pocketlm.generate.sequence import Sequence
from pocketlm.generate.speculative import check_draft, check_lookahead, speculative_tokens
from pocketlm.generate.stream import generate_tokens, stream_text
from pocketlm.tokenizer import Tokenizer

log = logging.getLogger("pocketlm")


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TopLogprob(NamedTuple):
    """One of the most likely tokens at a position: its id, log-probability and text."""

    token: int
    logprob: float
    text: str


@dataclass
class Completion:
    """A whole generation: its text, why it ended, what it cost."""

    text: str
    finish_reason: str
    usage: Usage
    stats: Stats
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # with logprobs=k (k >= 0)
    # With logprobs=k: the k most likely (id, logprob, text) at each generated token.
    top_logprobs: list[list[TopLogprob]] = field(default_factory=list)

    @classmethod
    def collect(cls, chunks: Iterator[Chunk], tokenizer: Tokenizer) -> Completion:
        """The whole of a stream; `tokenizer` names the alternatives in top_logprobs."""
        pieces: list[str] = []
        tokens, logprobs, top = [], [], []
        last = Chunk("")
        for last in chunks:
            pieces.append(last.text)
            if last.token is not None:
                tokens.append(last.token)
                if last.logprob is not None:
                    logprobs.append(last.logprob)
                    top.append(
                        [TopLogprob(t, lp, tokenizer.decode([t])) for t, lp in last.top_logprobs]
                    )
        stats = last.stats or Stats()
        usage = Usage(stats.prompt_tokens, stats.new_tokens)
        return cls(
            "".join(pieces),
            last.finish_reason or "length",
            usage,
            stats,
            tokens,
            logprobs,
            top if any(top) else [],
        )


class Engine:
    """A model with its tokenizer and context window, ready to generate text."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        context: int | None = None,
        name: str = "the model",
    ) -> None:
        if context is not None and context < 2:
            raise PocketLMError(f"context must be at least 2 tokens (got {context})")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        # The KV cache grows with use, but a 128k-token window is still GBs once filled:
        # by default it is capped, as llama.cpp's and Ollama's num_ctx are.
        self.context_length = min(context or CONTEXT, model.config.context_length)
        self.draft: Engine | None = None  # speculative decoding's draft (`use_draft`)
        self.lookahead = LOOKAHEAD  # tokens the draft proposes a round
        self.decode_step: CompiledDecode | None = None  # torch.compile'd, after `compile()`

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def use_draft(self, draft: Engine | None, *, lookahead: int = LOOKAHEAD) -> None:
        """Generate with speculative decoding, `draft` proposing `lookahead` tokens a round
        (None: stop). The draft must share this model's tokenizer; the output
        distribution is this model's."""
        check_lookahead(lookahead)
        if draft is not None:
            check_draft(self.tokenizer, draft.tokenizer, names=(self.name, draft.name))
        self.draft, self.lookahead = draft, lookahead

    def compile(self, *, store: Path | None = None) -> None:
        """Decode through torch.compile from now on, and compile now (a minute or more the
        first time for a model), not during the first answer. With a `store` folder the
        compiled step is kept there and a later process loads it in seconds. It pays for
        long answers only (docs/compile.md)."""
        if self.decode_step is None:
            self.decode_step = CompiledDecode(self.model, store=store)
            self.session().sequence.warm_up()

    def params(self, **options: object) -> GenerationParams:
        """Checked GenerationParams from keyword options (see GenerationParams)."""
        return GenerationParams.from_options(options, vocab_size=self.vocab_size)

    def encode_prompt(self, prompt: str | Seq[int], *, truncate: bool = True) -> list[int]:
        """Prompt ids, left-truncated (with a warning) to leave room in the window for at
        least one new token, or refused when `truncate` is False."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise PocketLMError("the prompt is empty: give some text to continue")
        room = self.context_length - 1
        if len(ids) > room:
            if not truncate:
                raise PocketLMError(
                    f"the prompt is {len(ids)} tokens but the context window is "
                    f"{self.context_length}; shorten it or allow truncation"
                )
            log.warning(
                "prompt is %d tokens; keeping the last %d (the context window is %d)",
                len(ids),
                room,
                self.context_length,
            )
            ids = ids[-room:]
        return ids

    def session(self) -> Session:
        """A KV cache of your own: successive prompts reuse what they share (a chat)."""
        return Session(self)

    def stream(self, prompt: str | Seq[int], **options: object) -> Iterator[Chunk]:
        """Yield text pieces as they are generated; the last carries the finish reason and
        the statistics. Options: max_tokens, stop, logprobs, truncate, and the sampling
        options of SamplingParams (temperature, top_k, top_p, min_p, repetition_penalty,
        presence_penalty, frequency_penalty, logit_bias, seed), and `schema` (a JSON schema
        dict or pydantic model class) or `grammar` (a generate.constraint.Grammar, or Lark /
        GBNF text) that the output must follow; checked here, at the call."""
        return self.session().stream(prompt, **options)

    def generate(self, prompt: str | Seq[int], **options: object) -> Completion:
        """Generate a whole completion: text, finish reason, usage and timing; with
        `logprobs=k`, each token's log-probability and the k most likely alternatives."""
        return self.session().generate(prompt, **options)


class Session:
    """One KV cache (and the draft's, with speculative decoding) that a caller holds."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sequence = Sequence(
            engine.model, max_seq_len=engine.context_length, decode=engine.decode_step
        )
        draft = engine.draft
        self.draft = (
            None if draft is None else Sequence(draft.model, max_seq_len=draft.context_length)
        )
        self._busy = threading.Lock()

    def stream(self, prompt: str | Seq[int], **options: object) -> Iterator[Chunk]:
        """As `Engine.stream`, in this session's cache."""
        params = self.engine.params(**options)
        return self.run(self.engine.encode_prompt(prompt, truncate=params.truncate), params)

    def generate(self, prompt: str | Seq[int], **options: object) -> Completion:
        """As `Engine.generate`, in this session's cache."""
        return Completion.collect(self.stream(prompt, **options), self.engine.tokenizer)

    def run(self, ids: list[int], params: GenerationParams) -> Iterator[Chunk]:
        """Generate after prompt `ids` with checked `params` (the caller checked both)."""
        if not self._busy.acquire(blocking=False):
            raise PocketLMError(
                "this session is already generating (an earlier stream is still open): "
                "finish or close it first, or use another session"
            )
        try:
            stats = Stats()
            text = TextStream(self.engine.tokenizer, params.stop)
            for chunk in stream_text(
                self._steps(ids, params, stats), text, max_tokens=params.max_tokens
            ):
                chunk.stats = stats if chunk.finish_reason is not None else None
                yield chunk
        finally:
            self._busy.release()

    def _steps(self, ids: list[int], params: GenerationParams, stats: Stats) -> Iterator[Step]:
        tokenizer = self.engine.tokenizer
        eos = tokenizer.eos_ids
        if self.draft is None:
            return generate_tokens(
                self.sequence, ids, params, eos_ids=eos, stats=stats, tokenizer=tokenizer
            )
        return speculative_tokens(
            self.sequence,
            self.draft,
            ids,
            params,
            eos_ids=eos,
            stats=stats,
            lookahead=self.engine.lookahead,
            tokenizer=tokenizer,
        )
