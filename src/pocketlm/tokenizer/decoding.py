"""Ids -> text: the raw bytes every token stands for, and the streaming detokenizer.

Decoding goes through one table of raw bytes per token, read from the `tokenizers` backend
the way its decoder reads tokens (GPT-2's byte alphabet, SentencePiece's "▁" and `<0xXX>`
byte pieces), so `Tokenizer.decode` and `StreamDecoder` agree byte for byte and streaming
costs O(1) per token. Added tokens (special or not) stand for their own text, as llama.cpp
decodes them. Knows nothing of how the backend was built or where it came from.

References: GPT-2 `encoder.py` (`bytes_to_unicode`), llama.cpp `llama-vocab.cpp`
(`token_to_piece`), HF `tokenizers` decoders (ByteLevel, ByteFallback, Replace, Strip).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable
from typing import Any

from tokenizers import Tokenizer as Backend

SPACE_MARK = "\u2581"  # SentencePiece's "▁", which stands for a space
SPM_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (encoder.py):
    printable Latin-1 bytes stand for themselves, the others move past 255, in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}
_ALPHABET = frozenset(BYTE_OF_CHAR)
# A byte-alphabet token to its bytes in two C-speed steps: each character to the Latin-1
# character of its byte, then Latin-1 encoding (vocabularies run to 262k tokens).
_TO_LATIN1 = str.maketrans({char: chr(byte) for char, byte in BYTE_OF_CHAR.items()})


def spec(component: Any) -> dict | None:
    """A `tokenizers` component (decoder, post-processor) as its tokenizer.json entry."""
    return None if component is None else json.loads(component.__getstate__())


def steps(entry: Any) -> list[dict]:
    """A component's tokenizer.json entry and, for a Sequence, its steps, flattened."""
    if not isinstance(entry, dict):
        return []
    inner = entry.get("decoders") or entry.get("processors") or []
    return [entry, *(step for part in inner for step in steps(part))]


def token_bytes_table(backend: Backend) -> list[bytes]:
    """Raw bytes of every id, read the way the backend's decoder reads tokens."""
    kinds = {step.get("type") for step in steps(spec(backend.decoder))}
    vocab = backend.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values(), default=-1) + 1)
    for token, index in vocab.items():
        if "ByteLevel" in kinds and _ALPHABET.issuperset(token):
            table[index] = token.translate(_TO_LATIN1).encode("latin-1")
        elif "ByteFallback" in kinds and (m := SPM_BYTE.fullmatch(token)):
            table[index] = bytes([int(m.group(1), 16)])
        elif "Metaspace" in kinds or "Replace" in kinds:
            table[index] = token.replace(SPACE_MARK, " ").encode("utf-8")
        else:
            table[index] = token.encode("utf-8")
    for index, added in backend.get_added_tokens_decoder().items():
        table[index] = added.content.encode("utf-8")  # "<|im_end|>", "   ", "õ": their text
    return table


def strips_leading_space(backend: Backend) -> bool:
    """Whether HF decoding drops one leading space (SentencePiece's prefix space)."""
    for step in steps(spec(backend.decoder)):
        if step.get("type") == "Strip" and step.get("content") == " " and step.get("start", 0):
            return True
        if step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never":
            return True
    return False


class StreamDecoder:
    """Turns ids into text as they come: holds the bytes of an unfinished character, so a
    piece never carries broken UTF-8, and never re-decodes earlier text (O(1) per token)."""

    def __init__(
        self, token_bytes: Callable[[int], bytes], *, strip_leading_space: bool = False
    ) -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = strip_leading_space

    def feed(self, token_id: int) -> str:
        """The text this token completes (often "", while a character is still partial)."""
        data = self._token_bytes(token_id)
        if self._strip and data:
            self._strip = False
            data = data.removeprefix(b" ")
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever is left; bytes of an unfinished character become U+FFFD."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
