"""What one request asks of the engine, checked before anything runs.

`GenerationParams` is the one description of a request below the entry points: the
sampling parameters (pocketlm.sampling), how many tokens, where to stop, whether to report
log-probabilities, and a grammar the output must follow (pocketlm.generate.constraint:
`schema=` a JSON schema dict or pydantic model class, or `grammar=` a Grammar or the text
of a Lark / GBNF grammar). Python callers give keyword options; `from_options` turns them into
params or fails at the call with one line that names a misspelt option and the nearest
valid one -- never later, at the first token. The server builds params from its wire
request (pocketlm.serve.convert) and the scheduler never sees an option by name.
Knows nothing of models, tokenizers or HTTP.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

from pocketlm.errors import PocketLMError
from pocketlm.generate import MAX_TOKENS
from pocketlm.generate.constraint import Grammar
from pocketlm.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationParams:
    """How to generate one completion. Built checked: by `from_options`, or by a caller
    that has checked each part (the server)."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = MAX_TOKENS
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    # None: no log-probabilities; 0: each token's own; k: and the k most likely alternatives
    logprobs: int | None = None
    truncate: bool = True  # a prompt longer than the window loses its start (else an error)
    grammar: Grammar | None = None  # the output must match it (constrained decoding)

    @classmethod
    def from_options(cls, options: Mapping[str, object], *, vocab_size: int) -> GenerationParams:
        """Params from keyword options (`max_tokens`, `stop`, `logprobs`, `truncate` and
        the fields of SamplingParams); a PocketLMError names the first bad one."""
        check_names(options)
        own = {name: options[name] for name in _OWN if options.get(name) is not None}
        sampling = {
            k: v for k, v in options.items() if k not in (*_OWN, *_GRAMMAR) and v is not None
        }
        grammar = grammar_option(options.get("schema"), options.get("grammar"))
        params = cls(sampling=SamplingParams(**sampling), grammar=grammar, **own)
        params.sampling.validate(vocab_size=vocab_size)
        return params.checked(vocab_size=vocab_size)

    def checked(self, *, vocab_size: int) -> GenerationParams:
        """These params with `stop` as a tuple, or a PocketLMError naming what is wrong."""
        max_tokens, logprobs = self.max_tokens, self.logprobs
        if not _is_int(max_tokens) or max_tokens < 1:
            raise PocketLMError(f"max_tokens must be at least 1 (got {max_tokens!r})")
        if logprobs is not None and not (_is_int(logprobs) and 0 <= logprobs <= vocab_size):
            raise PocketLMError(
                f"logprobs must be between 0 and the vocabulary size (got {logprobs!r})"
            )
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise PocketLMError("stop sequences must be non-empty strings")
        return replace(self, stop=tuple(stop))


_OWN = ("max_tokens", "stop", "logprobs", "truncate")
_GRAMMAR = ("schema", "grammar")
OPTIONS = (*_OWN, *_GRAMMAR, *(f.name for f in fields(SamplingParams)))


def grammar_option(schema: object, grammar: object) -> Grammar | None:
    """The Grammar of the `schema` option (a JSON schema dict or pydantic model class) or
    the `grammar` option (a Grammar, or a Lark / GBNF grammar's text); at most one."""
    if schema is not None and grammar is not None:
        raise PocketLMError("give either schema or grammar, not both")
    if schema is not None:
        return Grammar.json_schema(schema)
    if grammar is None or isinstance(grammar, Grammar):
        return grammar
    if isinstance(grammar, str):
        return Grammar.from_file_text(grammar)
    raise PocketLMError(
        f"grammar must be a Grammar or a grammar's text (got {type(grammar).__name__})"
    )


def check_names(options: Mapping[str, object]) -> None:
    """Refuse an unknown option, naming the nearest known one."""
    for name in options:
        if name not in OPTIONS:
            near = difflib.get_close_matches(name, OPTIONS, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"options are: {', '.join(OPTIONS)}"
            raise PocketLMError(f"unknown option {name!r}; {hint}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
