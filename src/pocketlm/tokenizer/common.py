"""What every tokenizer source hands to `Tokenizer`, and the small checks they share.

`Parts` is a built `tokenizers` backend plus what the source says around it (BOS/EOS, the
chat template, the named special tokens). `pocketlm.tokenizer.folder` and
`pocketlm.tokenizer.gguf` each make one; neither knows the other.

Reference: llama.cpp `llama-vocab.cpp` (the end-of-generation token texts).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer as Backend

# Tokens that end a turn whatever the metadata says: llama.cpp's end-of-generation texts
# (its "</s>" is PaddleOCR's alone; elsewhere "</s>" is the file's own EOS when it ends text).
END_OF_TURN_TEXTS = frozenset(
    {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"}
    | {"<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<end_of_utterance>", "[e~["}
    | {"<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<eos>", "<turn|>"}
    | {"<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>"}  # Gemma 4, DeepSeek
)
# The named special tokens transformers hands to chat templates.
NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token")
NAMED_SPECIALS += ("mask_token",)


@dataclass(frozen=True)
class Parts:
    """A tokenizer as a source describes it, ready for `Tokenizer`."""

    backend: Backend
    eos_ids: frozenset[int]
    bos_id: int | None = None
    add_bos: bool = False
    eos_suffix: int | None = None  # EOS appended after the text (add_eos_token)
    chat_template: str | None = None
    special_tokens: Mapping[str, str] = field(default_factory=dict)


def is_id(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if is_id(v)]


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def end_of_turn_ids(texts: Mapping[int, str]) -> set[int]:
    """The ids among `texts` (id -> token text) that end a turn by their text, as llama.cpp
    decides: where a vocabulary has "<|return|>" and "<|call|>" (gpt-oss) or "<|calls|>" and
    "<|flush|>" (Solar Open), its "<|end|>" only ends a message inside the turn."""
    ends = {i: t for i, t in texts.items() if t in END_OF_TURN_TEXTS}
    found = set(ends.values())
    if {"<|return|>", "<|call|>"} <= found or {"<|calls|>", "<|flush|>"} <= found:
        ends = {i: t for i, t in ends.items() if t != "<|end|>"}
    return set(ends)


def special_texts(backend: Backend) -> dict[int, str]:
    """id -> text of the backend's special added tokens."""
    return {i: t.content for i, t in backend.get_added_tokens_decoder().items() if t.special}
