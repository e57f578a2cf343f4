"""Text <-> token ids, chat templates, and a streaming detokenizer.

Three ways in: the shipped GPT-2 vocabulary (`Tokenizer.gpt2()`), a Hugging Face folder
(`from_dir`, see `pocketlm.tokenizer.folder`), and the plain metadata dict of a GGUF file
(`from_gguf_metadata`, see `pocketlm.tokenizer.gguf`: byte-level BPE under every
pre-tokenizer llama.cpp names, SentencePiece, Gemma 4). The tokenizing itself is the
`tokenizers` library; the modules beside this one only assemble it the way each source
describes, and know nothing of models, weights, sampling or files beyond the tokenizer's own.

Decoding goes through one table of raw bytes per token (`pocketlm.tokenizer.decoding`), so
`decode` and `StreamDecoder` agree byte for byte and streaming costs O(1) per token. Chat
templates are compiled and rendered by `pocketlm.tokenizer.chat_template`; `render_chat` is
the entry point.

References: GPT-2 `encoder.py`, HF `tokenizers`, llama.cpp `llama-vocab.cpp`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Tokenizer as Backend

from pocketlm.errors import PocketLMError
from pocketlm.tokenizer.chat_template import compile_template as _compile_template
from pocketlm.tokenizer.chat_template import render as render_template
from pocketlm.tokenizer.common import Parts, special_texts
from pocketlm.tokenizer.decoding import StreamDecoder, strips_leading_space, token_bytes_table
from pocketlm.tokenizer.folder import gpt2_backend, read_folder
from pocketlm.tokenizer.gguf import read_metadata

__all__ = ["StreamDecoder", "Tokenizer"]


class Tokenizer:
    """Text <-> ids for one model: encode, decode, stream-decode and render chats."""

    def __init__(
        self,
        backend: Backend,
        *,
        eos_ids: frozenset[int],
        bos_id: int | None = None,
        add_bos: bool = False,
        eos_suffix: int | None = None,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self._backend = backend
        self.bos_id = bos_id
        self.eos_ids = frozenset(eos_ids)
        self.add_bos = add_bos
        # The EOS a model asks for after its text (add_eos_token; almost no causal model does).
        self.eos_suffix = eos_suffix
        self.chat_template = chat_template
        # Named special tokens (bos_token, eos_token...) as chat templates see them.
        self.special_tokens = dict(special_tokens or {})
        self._bytes = token_bytes_table(backend)
        # Ids of the special added tokens (<|im_end|>...): markup, never part of plain text.
        self.special_ids = frozenset(special_texts(backend))
        # SentencePiece decoding drops the prefix space of the first word, as HF does.
        self._strip_leading_space = strips_leading_space(backend)
        self.vocab_size = len(self._bytes)
        self._template: jinja2.Template | None = None

    @classmethod
    def _from_parts(cls, parts: Parts) -> Tokenizer:
        return cls(
            parts.backend,
            eos_ids=parts.eos_ids,
            bos_id=parts.bos_id,
            add_bos=parts.add_bos,
            eos_suffix=parts.eos_suffix,
            chat_template=parts.chat_template,
            special_tokens=dict(parts.special_tokens),
        )

    # -- constructors --

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """The original GPT-2 vocabulary (50,257 tokens) shipped with pocketlm."""
        folder = resources.files("pocketlm") / "data" / "gpt2"
        with (
            resources.as_file(folder / "vocab.json") as vocab,
            resources.as_file(folder / "merges.txt") as merges,
        ):
            backend = gpt2_backend(vocab, merges)
        end = backend.token_to_id("<|endoftext|>")
        names = dict.fromkeys(("bos_token", "eos_token", "unk_token"), "<|endoftext|>")
        return cls(backend, bos_id=end, eos_ids=frozenset({end}), special_tokens=names)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """A Hugging Face tokenizer folder: tokenizer.json (or vocab.json + merges.txt) and
        the optional tokenizer_config.json, special_tokens_map.json, chat_template.jinja,
        config.json and generation_config.json."""
        return cls._from_parts(read_folder(path))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer a GGUF file describes in its metadata (`tokenizer.ggml.*` and
        `tokenizer.chat_template`), as a plain dict: byte-level BPE ("gpt2", under any
        pre-tokenizer llama.cpp knows), SentencePiece ("llama") or Gemma 4's BPE. Encoder
        vocabularies (BERT, T5) and unknown kinds are refused with a one-line reason."""
        return cls._from_parts(read_metadata(meta))

    # -- text <-> ids --

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids for `text`; special tokens written in the text ("<|im_start|>") become
        their ids. BOS is prepended when `add_bos` (default: the tokenizer's own setting);
        under the default, a model that asks for it (`eos_suffix`) also gets EOS appended."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return self._with_specials(ids, add_bos)

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool | None = None) -> list[list[int]]:
        """`encode` for many texts at once (in parallel inside `tokenizers`)."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_specials(e.ids, add_bos) for e in encodings]

    def _with_specials(self, ids: list[int], add_bos: bool | None) -> list[int]:
        wanted = self.add_bos if add_bos is None else add_bos
        if wanted and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_bos is None and self.eos_suffix is not None:
            ids = [*ids, self.eos_suffix]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens included; invalid UTF-8 becomes U+FFFD."""
        text = b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
        if self._strip_leading_space and text.startswith(" "):
            text = text[1:]  # SentencePiece's prefix space on the first word (as HF decodes)
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (special tokens: their text in UTF-8). Ids
        outside the vocabulary (an embedding padded past it) stand for nothing."""
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def token_to_id(self, token: str) -> int | None:
        """The id of a token spelled as in the vocabulary (e.g. "<|im_end|>"), or None."""
        return self._backend.token_to_id(token)

    def stream_decoder(self, *, at_start: bool = False) -> StreamDecoder:
        """A detokenizer fed one id at a time. `at_start=True` when the ids begin the text
        (then it equals `decode` exactly); the default suits a continuation of a prompt,
        where a SentencePiece word's leading space is real. Byte-level BPE ignores it."""
        return StreamDecoder(
            self.token_bytes, strip_leading_space=at_start and self._strip_leading_space
        )

    # -- chat --

    def render_chat(
        self, messages: list[dict], *, add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt text of a conversation under the model's chat template, exactly as
        transformers' `apply_chat_template(..., tokenize=False)` renders it. Extra keyword
        arguments (tools, documents, enable_thinking...) become template variables. Encode
        the result with `add_bos=False`: templates write BOS themselves."""
        if self.chat_template is None:
            raise PocketLMError(
                "this model has no chat template: prompt it with plain text, or use a chat (instruct) model"
            )
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return render_template(
            self._template,
            messages,
            add_generation_prompt=add_generation_prompt,
            variables={**self.special_tokens, **extra},
        )
