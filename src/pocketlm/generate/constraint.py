"""Constrained decoding: at each step only the tokens a grammar allows may be sampled.

The grammar work is llguidance's (guidance-ai/llguidance; why this library and not
xgrammar or outlines-core: docs/structured.md); this module is the engine's side of it.

    grammar = Grammar.json_schema(schema)      # or .json_object(), .lark(text),
                                               #    .gbnf(text), .regex(pattern)
    constraint = grammar.bind(tokenizer, vocab_size=V)   # once per request
    state = constraint.start()                 # one per row (each choice of n > 1)
    state.mask()                               # compute the next mask (CPU; drops the GIL,
                                               #   so a worker thread may overlap it with
                                               #   the forward pass)
    logits = state.apply(logits)               # disallowed tokens -> -inf, on logits' device
    state.accept(token)
    state.done                                 # nothing but end-of-text may follow: the
                                               #   row ends with finish reason "stop"
    state.rollback(k); state.fork()            # speculative decoding; a copy of this state

- `Grammar` is what the output must match, tokenizer-free and checked when built: a JSON
  schema the library cannot enforce (uniqueItems, not, if/then...) or a grammar with an
  error is a one-line PocketLMError naming it, before any token is generated.
  `Grammar.lark` texts may mix free text and JSON: a rule `%json { <schema> }` matches
  JSON valid under that schema (`json_rule(schema)` writes one), e.g.
      start: TEXT | "<tool_call>" call "</tool_call>"
      call: %json {"type": "object", ...}
- `Constraint` is a grammar bound to one vocabulary; the vocabulary object (llguidance's
  `LLTokenizer`, ~0.25 s to build for a 49k vocabulary) is made once per tokenizer and kept.
- `GrammarState` is one row's position in the grammar.

End-of-text is allowed exactly when the grammar is complete. Knows nothing of models,
sampling options or HTTP.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import llguidance
import numpy as np
import torch

from pocketlm.errors import PocketLMError
from pocketlm.tokenizer import Tokenizer

# JSON output as models are prompted to write it: no free whitespace between tokens
# (a small model that may emit any amount of it can wander into endless newlines).
_JSON_OPTIONS = {"whitespace_flexible": False}


class Grammar:
    """What a generated text must match, in llguidance's grammar form; checked when built."""

    def __init__(self, text: str, *, description: str) -> None:
        self.text = text  # llguidance's serialized grammar
        self.description = description  # for error messages: "the JSON schema", ...
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, None)
        if failed:
            raise PocketLMError(f"{description} cannot be used: {_one_line(messages[0])}")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | type) -> Grammar:
        """JSON valid under `schema`: a dict, or a pydantic model class."""
        schema = schema_dict(schema)
        text = llguidance.LLMatcher.grammar_from_json_schema(dict(schema), defaults=_JSON_OPTIONS)
        return cls(text, description="the JSON schema")

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's response_format json_object)."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def lark(cls, text: str) -> Grammar:
        """A grammar in llguidance's Lark dialect (with `%json {schema}` rules)."""
        return cls(llguidance.LLMatcher.grammar_from_lark(text), description="the Lark grammar")

    @classmethod
    def gbnf(cls, text: str) -> Grammar:
        """A grammar in llama.cpp's GBNF."""
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            lark = gbnf_to_lark(text)
        except Exception as error:  # the converter raises several kinds on bad input
            raise PocketLMError(f"the GBNF grammar cannot be used: {_one_line(error)}") from None
        return cls(llguidance.LLMatcher.grammar_from_lark(lark), description="the GBNF grammar")

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        """Text matching a regular expression (as a whole)."""
        return cls(llguidance.LLMatcher.grammar_from_regex(pattern), description="the regex")

    @classmethod
    def from_file_text(cls, text: str) -> Grammar:
        """A grammar file's text: GBNF when it defines `root ::=`, else Lark."""
        return cls.gbnf(text) if "::=" in text else cls.lark(text)

    def bind(self, tokenizer: Tokenizer, *, vocab_size: int) -> Constraint:
        """This grammar for a model with `tokenizer` and `vocab_size` logits."""
        return Constraint(self, tokenizer_info(tokenizer), vocab_size=vocab_size)

    def __repr__(self) -> str:
        return f"Grammar({self.description})"


def schema_dict(schema: Mapping[str, Any] | type) -> dict:
    """A JSON schema as a dict: given as one, or a pydantic model class's own schema."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema()
    if not isinstance(schema, Mapping):
        raise PocketLMError(
            f"a JSON schema must be a dict or a pydantic model class (got {type(schema).__name__})"
        )
    return dict(schema)


def json_rule(schema: Mapping[str, Any] | type) -> str:
    """A Lark rule body matching JSON valid under `schema`: `%json { ... }`."""
    return "%json " + json.dumps(schema_dict(schema), separators=(",", ":"))


class Constraint:
    """A grammar bound to one vocabulary; `start()` gives each row its own state."""

    def __init__(self, grammar: Grammar, info: llguidance.LLTokenizer, *, vocab_size: int) -> None:
        self.grammar, self.info, self.vocab_size = grammar, info, vocab_size

    def start(self) -> GrammarState:
        """A fresh state at the grammar's start."""
        matcher = llguidance.LLMatcher(self.info, self.grammar.text, log_level=0)
        if matcher.is_error():
            raise PocketLMError(
                f"{self.grammar.description} cannot be used: {_one_line(matcher.get_error())}"
            )
        return GrammarState(
            matcher,
            mask_size=self.info.vocab_size,
            vocab_size=self.vocab_size,
            description=self.grammar.description,
        )


class GrammarState:
    """One row's position in a grammar: its mask, the tokens it accepts, when it is done."""

    def __init__(
        self,
        matcher: llguidance.LLMatcher,
        *,
        mask_size: int,
        vocab_size: int,
        description: str,
    ) -> None:
        self.matcher = matcher
        self.mask_size = mask_size  # tokens the tokenizer has (the model may have more logits)
        self.vocab_size = vocab_size
        self.description = description
        # One bit per token, on the CPU, where llguidance writes it.
        self.bitmask = torch.zeros((mask_size + 31) // 32, dtype=torch.int32)
        self._fresh = False  # whether `bitmask` is the mask of the current position
        self._allowed: torch.Tensor | None = None  # the mask as a (V,) bool, on a device

    def mask(self) -> None:
        """Compute the allowed tokens at the current position (into `bitmask`)."""
        if not self._fresh:
            b = self.bitmask
            self.matcher.unsafe_compute_mask_ptr(b.data_ptr(), b.numel() * b.element_size())
            self._check()
            self._fresh, self._allowed = True, None

    def allowed(self, device: torch.device | str) -> torch.Tensor:
        """The mask at the current position as a (V,) bool tensor on `device`."""
        self.mask()
        if self._allowed is None or self._allowed.device != torch.device(device):
            # One byte per token, unpacked by numpy: ~5 us for 49k tokens, where torch's
            # shift-and-mask takes several passes over (W, 32) (measured 2.5x slower).
            bits = np.unpackbits(self.bitmask.numpy().view(np.uint8), bitorder="little")
            allowed = torch.from_numpy(bits[: self.vocab_size]).view(torch.bool)
            if len(allowed) < self.vocab_size:  # ids past the tokenizer: never allowed
                allowed = torch.cat([allowed, allowed.new_zeros(self.vocab_size - len(allowed))])
            self._allowed = allowed.to(device)
        return self._allowed

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (V,) with every token the grammar forbids here set to -inf (a new
        tensor, on the logits' device)."""
        # torch.where, not masked_fill(~allowed): one pass over the logits, not three
        return torch.where(self.allowed(logits.device), logits, float("-inf"))

    def accept(self, token: int) -> None:
        """Advance past `token` (which the mask allowed)."""
        self.matcher.consume_token(token)
        self._check()
        self._fresh = False

    @property
    def done(self) -> bool:
        """True when the grammar is complete and nothing but end-of-text may follow."""
        return self.matcher.is_stopped()

    def rollback(self, n: int) -> None:
        """Undo the last `n` accepted tokens."""
        if n:
            self.matcher.rollback(n)
            self._check()
            self._fresh = False

    def fork(self) -> GrammarState:
        """An independent copy of this state (same position, own future)."""
        return GrammarState(
            self.matcher.deep_copy(),
            mask_size=self.mask_size,
            vocab_size=self.vocab_size,
            description=self.description,
        )

    def _check(self) -> None:
        if self.matcher.is_error():
            raise PocketLMError(
                f"{self.description} could not be followed: {_one_line(self.matcher.get_error())}"
            )


# -- the vocabulary, as llguidance sees it: built once per tokenizer --

_INFO: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_INFO_LOCK = threading.Lock()


def tokenizer_info(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer` (each token's bytes, the special and end-of-text
    tokens), made on first use and kept while the tokenizer lives."""
    with _INFO_LOCK:
        info = _INFO.get(tokenizer)
        if info is None:
            info = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(_Vocabulary(tokenizer)),
                eos_token=sorted(tokenizer.eos_ids),
            )
            _INFO[tokenizer] = info
        return info


class _Vocabulary:
    """The fields llguidance's TokenizerWrapper reads, from a pocketlm Tokenizer: every
    token's raw bytes, which are special (never part of grammar text) and how to encode."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(tokenizer.special_ids)
        self.eos_token_id = min(tokenizer.eos_ids) if tokenizer.eos_ids else None
        self.bos_token_id = tokenizer.bos_id

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", errors="replace"), add_bos=False)


def _one_line(message: object) -> str:
    return " ".join(str(message).split())
