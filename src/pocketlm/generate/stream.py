"""One sequence's generation, in layers: a token iterator, then a text iterator.

`generate_tokens` prefills the prompt into a `Sequence` (which computes only what its cache
does not already hold) and samples with the request's `Sampler` until max_tokens or
end-of-text; `stream_text` turns any such steps into text chunks through the request's
`TextStream`. Speculative decoding (pocketlm.generate.speculative) is a second token
iterator with the same contract; the server's scheduler uses the same Sampler and
TextStream for its batched rows. Knows nothing of HTTP or terminals.
(gpt-fast `prefill`/`decode_one_token`, mlx-lm `generate_step` -> `stream_generate`.)
"""

import time
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import replace

from pocketlm.generate.params import GenerationParams
from pocketlm.generate.request import Chunk, Sampler, Stats, Step, TextStream
from pocketlm.generate.sequence import Sequence
from pocketlm.tokenizer import Tokenizer


def generate_tokens(
    seq: Sequence,
    prompt_ids: Seq[int],
    params: GenerationParams,
    *,
    eos_ids: Iterable[int] = (),
    stats: Stats | None = None,
    tokenizer: Tokenizer | None = None,
) -> Iterator[Step]:
    """Prefill the prompt, then sample up to `params.max_tokens` tokens, stopping after
    an end-of-text token or when the request's grammar is complete (a constrained
    request needs the `tokenizer`)."""
    stats = stats if stats is not None else Stats()
    stats.prompt_tokens = len(prompt_ids)
    eos = frozenset(eos_ids)
    sampler = Sampler(
        params, prompt_ids, vocab_size=seq.vocab_size, device=seq.device, tokenizer=tokenizer
    )
    started = time.perf_counter()
    logits = seq.prefill(prompt_ids)
    stats.prefilled_tokens = seq.last_prefill_size
    for i in range(params.max_tokens):
        step = sampler.step(logits)
        stats.record_token(started)
        yield step
        if step.token in eos or step.final or i == params.max_tokens - 1:
            return
        logits = seq.step(step.token)


def stream_text(steps: Iterable[Step], text: TextStream, *, max_tokens: int) -> Iterator[Chunk]:
    """The text chunks of `steps`; the last one carries the finish reason."""
    for n, step in enumerate(steps, start=1):
        chunk = text.feed(step, last=n >= max_tokens)
        yield chunk
        if chunk.finish_reason is not None:
            return


def lstrip_text(chunks: Iterable[Chunk]) -> Iterator[Chunk]:
    """The chunks without the whitespace that opens the text (an answer written after
    "A:" or "Assistant:" starts with a space that is part of its first token)."""
    started = False
    for chunk in chunks:
        if not started:
            chunk = replace(chunk, text=chunk.text.lstrip())
            started = bool(chunk.text)
        yield chunk
