"""Text <-> token ids, chat templates, and a streaming detokenizer.

Three ways in: the shipped GPT-2 vocabulary (`Tokenizer.gpt2()`), a Hugging Face folder
(`from_dir`: tokenizer.json, or vocab.json + merges.txt, plus tokenizer_config.json), and the
plain metadata dict of a GGUF file (`from_gguf_metadata`). The BPE itself is the `tokenizers`
library; this module only assembles it the way each source describes, and knows nothing of
models, weights, sampling or files beyond the tokenizer's own.

Decoding goes through one table of raw bytes per token, so `decode` and `StreamDecoder` agree
byte for byte and streaming costs O(1) per token.

Chat templates are compiled and rendered by `pocketlm.tokenizer.chat_template`; `render_chat` is the
entry point.

References: GPT-2 `encoder.py` (byte alphabet), HF `tokenizers` (ByteLevel, Digits, Split),
llama.cpp `llama-vocab.cpp` (GGUF pre-tokenizer types, end-of-generation tokens).
"""

from __future__ import annotations

import codecs
import json
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from pocketlm.errors import CorruptModelError, PocketLMError
from pocketlm.tokenizer.chat_template import compile_template as _compile_template
from pocketlm.tokenizer.chat_template import render as render_template

# -- the byte alphabet ------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (encoder.py):
    printable Latin-1 bytes stand for themselves, the others move past 255, in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


_BYTE_OF_CHAR = {char: byte for byte, char in _bytes_to_unicode().items()}
_SPM_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# -- pre-tokenizers by GGUF `tokenizer.ggml.pre` ----------------------------------------------

# Llama 3's split (its tokenizer.json); llama.cpp LLAMA_VOCAB_PRE_TYPE_LLAMA3.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's split: Llama 3's, but every digit alone.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# name -> (pre-tokenizer kind, add BOS unless the file says, BPE ignore_merges), after
# llama.cpp's table. "gpt2" is ByteLevel's own regex; "digits" splits every digit off first
# (the StarCoder/SmolLM tokenizer.json, llama.cpp's "\p{N}" then the GPT-2 regex). The
# transformers GGUF loader gives "smollm" plain "gpt2" instead, which differs on a run of
# spaces before a digit ("  1"): we follow the model's own tokenizer and llama.cpp.
_GGUF_PRE: dict[str, tuple[str, bool, bool]] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2"), ("gpt2", False, False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r"), ("digits", False, False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3"), ("llama3", True, True)),
    **dict.fromkeys(("dbrx", "smaug-bpe"), ("llama3", False, False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), ("qwen2", False, False)),
}


def _pre_tokenizer(kind: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "gpt2":
        return byte_level
    if kind == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {"llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[kind]
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# Tokens that end a turn whatever the metadata says (llama.cpp's end-of-generation list).
_END_OF_TURN_TEXTS = frozenset({"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<EOT>"}) | {
    *("<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<end_of_utterance>")
}
# The named special tokens transformers hands to chat templates.
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token")
_NAMED_SPECIALS += ("mask_token",)
# Named special tokens -> GGUF id keys (as transformers' GGUF loader names them).
_GGUF_NAMED = {"bos_token": "bos_token_id", "eos_token": "eos_token_id"}
_GGUF_NAMED |= {"unk_token": "unknown_token_id", "pad_token": "padding_token_id"}

# -- the tokenizer ----------------------------------------------------------------------------


class Tokenizer:
    """Text <-> ids for one model: encode, decode, stream-decode and render chats."""

    def __init__(
        self,
        backend: Backend,
        *,
        eos_ids: frozenset[int],
        bos_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self._backend = backend
        self.bos_id = bos_id
        self.eos_ids = frozenset(eos_ids)
        self.add_bos = add_bos
        self.chat_template = chat_template
        # Named special tokens (bos_token, eos_token...) as chat templates see them.
        self.special_tokens = dict(special_tokens or {})
        decoder = _spec(backend.decoder)
        self._bytes = _token_bytes_table(backend, decoder)
        # SentencePiece decoding drops the prefix space of the first word, as HF does.
        self._strip_leading_space = _decoder_strips_space(decoder)
        self.vocab_size = len(self._bytes)
        self._template: jinja2.Template | None = None

    # -- constructors --

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """The original GPT-2 vocabulary (50,257 tokens) shipped with pocketlm."""
        folder = resources.files("pocketlm") / "data" / "gpt2"
        with (
            resources.as_file(folder / "vocab.json") as vocab,
            resources.as_file(folder / "merges.txt") as merges,
        ):
            backend = _gpt2_backend(vocab, merges)
        end = backend.token_to_id("<|endoftext|>")
        names = dict.fromkeys(("bos_token", "eos_token", "unk_token"), "<|endoftext|>")
        return cls(backend, bos_id=end, eos_ids=frozenset({end}), special_tokens=names)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """A Hugging Face tokenizer folder: tokenizer.json (or vocab.json + merges.txt) and
        the optional tokenizer_config.json, special_tokens_map.json, chat_template.jinja,
        config.json and generation_config.json."""
        folder = Path(path)
        if not folder.is_dir():
            raise PocketLMError(f"{folder} is not a folder: give a folder holding tokenizer.json")
        backend, bare_bpe = _load_backend(folder)
        config = _read_json(folder / "tokenizer_config.json")
        _add_config_tokens(backend, config.get("added_tokens_decoder") or {})
        names = _named_specials(config, _read_json(folder / "special_tokens_map.json"))
        if bare_bpe and backend.token_to_id("<|endoftext|>") is not None:
            # GPT2TokenizerFast's defaults for a bare vocab.json + merges.txt.
            for name in ("bos_token", "eos_token", "unk_token"):
                names.setdefault(name, "<|endoftext|>")
        model_configs = [_read_json(folder / f) for f in ("generation_config.json", "config.json")]
        bos_id = _token_id(backend, names.get("bos_token"))
        if bos_id is None:
            bos_id = next(
                (c["bos_token_id"] for c in model_configs if _is_id(c.get("bos_token_id"))), None
            )
        eos = {i for c in model_configs for i in _ids(c.get("eos_token_id"))}
        eos |= {i for i in [_token_id(backend, names.get("eos_token"))] if i is not None}
        eos |= _end_of_turn_ids(backend)
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = _post_processor_adds(_spec(backend.post_processor), bos_id)
        return cls(
            backend,
            bos_id=bos_id,
            eos_ids=frozenset(eos),
            add_bos=bool(add_bos) and bos_id is not None,
            chat_template=_chat_template(folder, config),
            special_tokens=names,
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """The byte-level BPE tokenizer a GGUF file describes in its metadata
        (`tokenizer.ggml.*` and `tokenizer.chat_template`), as a plain dict."""
        kind, default_add_bos, ignore_merges = _gguf_pre(meta)
        backend = _gguf_backend(meta, kind=kind, ignore_merges=ignore_merges)
        tokens = meta["tokenizer.ggml.tokens"]

        def token_at(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            return value if _is_id(value) and value < len(tokens) else None

        names = {n: tokens[i] for n, key in _GGUF_NAMED.items() if (i := token_at(key)) is not None}
        ends = {token_at(k) for k in ("eos_token_id", "eot_token_id", "eom_token_id")} - {None}
        bos_id = token_at("bos_token_id")
        add_bos = meta.get("tokenizer.ggml.add_bos_token", default_add_bos)
        return cls(
            backend,
            bos_id=bos_id,
            eos_ids=frozenset(ends | _end_of_turn_ids(backend)),
            add_bos=bool(add_bos) and bos_id is not None,
            chat_template=meta.get("tokenizer.chat_template"),
            special_tokens=names,
        )

    # -- text <-> ids --

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids for `text`; special tokens written in the text ("<|im_start|>") become
        their ids. BOS is prepended when `add_bos` (default: the tokenizer's own setting)."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool | None = None) -> list[list[int]]:
        """`encode` for many texts at once (in parallel inside `tokenizers`)."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(e.ids, add_bos) for e in encodings]

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        wanted = self.add_bos if add_bos is None else add_bos
        return [self.bos_id, *ids] if wanted and self.bos_id is not None else ids

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


# -- building backends ------------------------------------------------------------------------


def _gpt2_backend(vocab: Path, merges: Path) -> Backend:
    """GPT-2's byte-level BPE (as GPT2TokenizerFast builds it) from vocab.json + merges.txt."""
    backend = Backend(models.BPE.from_file(str(vocab), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    if backend.token_to_id("<|endoftext|>") is not None:
        backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return backend


def _load_backend(folder: Path) -> tuple[Backend, bool]:
    """The folder's tokenizer, and whether it is a bare vocab.json + merges.txt (GPT-2 style:
    the pre-tokenizer is then GPT-2's, as GPT2TokenizerFast assumes)."""
    file = folder / "tokenizer.json"
    if file.is_file():
        try:
            return Backend.from_file(str(file)), False
        except Exception as error:  # tokenizers raises a bare Exception on a bad file
            raise CorruptModelError(
                f"{file} cannot be read as a tokenizer ({_one_line(error)})"
            ) from None
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        try:
            return _gpt2_backend(folder / "vocab.json", folder / "merges.txt"), True
        except Exception as error:
            raise CorruptModelError(
                f"{folder}/vocab.json + merges.txt cannot be read ({_one_line(error)})"
            ) from None
    raise PocketLMError(
        f"no tokenizer in {folder}: expected tokenizer.json, or vocab.json + merges.txt "
        "(with an optional tokenizer_config.json)"
    )


def _gguf_pre(meta: Mapping[str, Any]) -> tuple[str, bool, bool]:
    """Check the GGUF describes a tokenizer we build; its `_GGUF_PRE` entry."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise PocketLMError(
            f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2'); "
            "use the model's Hugging Face folder with tokenizer.json instead"
        )
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    complete = tokens and "tokenizer.ggml.merges" in meta
    if not complete or (types is not None and len(types) != len(tokens)):
        raise CorruptModelError(
            "the GGUF's tokenizer.ggml.tokens/merges/token_type are missing or disagree"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _GGUF_PRE:
        raise PocketLMError(
            f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(_GGUF_PRE))}); "
            "use the model's Hugging Face folder with tokenizer.json instead"
        )
    return _GGUF_PRE[pre]


def _gguf_backend(meta: Mapping[str, Any], *, kind: str, ignore_merges: bool) -> Backend:
    """A byte-level BPE from GGUF vocab and merges; control tokens (type 3) become special
    tokens and user-defined ones (type 4) plain added tokens, both matched whole in text."""
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    raw_types = meta.get("tokenizer.ggml.token_type")
    types = [1] * len(tokens) if raw_types is None else [int(t) for t in raw_types]
    spell = _bytes_to_unicode()
    alphabet = set(spell.values())
    # A token written outside the byte alphabet is respelled in it, as transformers does.
    vocab = {
        t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    backend = Backend(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    backend.pre_tokenizer = _pre_tokenizer(kind)
    backend.decoder = decoders.ByteLevel()
    # A "control" token outside the byte alphabet is a mislabel (transformers skips it too).
    control = [t for t, k in zip(tokens, types, strict=True) if k == 3 and set(t) <= alphabet]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    user = [t for t, k in zip(tokens, types, strict=True) if k == 4 and t in vocab]
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return backend


def _add_config_tokens(backend: Backend, decoder: Mapping[str, Any]) -> None:
    """tokenizer_config.json's added_tokens_decoder entries the backend lacks."""
    known = backend.get_added_tokens_decoder()
    for index, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        if int(index) in known or not isinstance(entry, dict) or "content" not in entry:
            continue
        fields = ("single_word", "lstrip", "rstrip", "normalized", "special")
        token = AddedToken(entry["content"], **{f: entry[f] for f in fields if f in entry})
        if entry.get("special"):
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])


def _spec(component: Any) -> dict | None:
    """A `tokenizers` component (decoder, post-processor) as its tokenizer.json entry."""
    return None if component is None else json.loads(component.__getstate__())


def _steps(spec: Any) -> list[dict]:
    """A component's tokenizer.json entry and, for a Sequence, its steps, flattened."""
    if not isinstance(spec, dict):
        return []
    inner = spec.get("decoders") or spec.get("processors") or []
    return [spec, *(step for part in inner for step in _steps(part))]


def _token_bytes_table(backend: Backend, decoder: dict | None) -> list[bytes]:
    """Raw bytes of every id, read the way the backend's decoder reads tokens."""
    kinds = {step.get("type") for step in _steps(decoder)}
    vocab = backend.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values(), default=-1) + 1)
    for token, index in vocab.items():
        if "ByteLevel" in kinds and all(c in _BYTE_OF_CHAR for c in token):
            table[index] = bytes(_BYTE_OF_CHAR[c] for c in token)
        elif "ByteFallback" in kinds and (m := _SPM_BYTE.fullmatch(token)):
            table[index] = bytes([int(m.group(1), 16)])
        elif "Metaspace" in kinds or "Replace" in kinds:
            table[index] = token.replace("\u2581", " ").encode("utf-8")
        else:
            table[index] = token.encode("utf-8")
    return table


def _decoder_strips_space(decoder: dict | None) -> bool:
    """Whether HF decoding drops one leading space (SentencePiece's prefix space)."""
    for step in _steps(decoder):
        if step.get("type") == "Strip" and step.get("content") == " " and step.get("start", 0):
            return True
        if step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never":
            return True
    return False


def _post_processor_adds(spec: dict | None, bos_id: int | None) -> bool:
    """Whether tokenizer.json's post-processor puts BOS first (Llama 3 adds BOS this way)."""
    for step in _steps(spec):
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0].get("SpecialToken", {}).get("id")
            ids = step.get("special_tokens", {}).get(first, {}).get("ids")
            if ids and ids[0] == bos_id:
                return True
    return False


# -- folder metadata --------------------------------------------------------------------------


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # bad UTF-8 or JSON, huge ints, deep nesting
        raise CorruptModelError(f"{file} is not valid JSON ({error}); fix or remove it") from None
    return data if isinstance(data, dict) else {}


def _content(value: Any) -> str | None:
    """A special token as configs write it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _named_specials(config: Mapping[str, Any], legacy_map: Mapping[str, Any]) -> dict[str, str]:
    values = {n: _content(config.get(n)) or _content(legacy_map.get(n)) for n in _NAMED_SPECIALS}
    return {name: value for name, value in values.items() if value is not None}


def _chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja, chat_template.json, or tokenizer_config.json's entry (a string,
    or a list of named templates, where "default" is the one to use)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _is_id(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if _is_id(v)]


def _token_id(backend: Backend, token: str | None) -> int | None:
    return None if token is None else backend.token_to_id(token)


def _end_of_turn_ids(backend: Backend) -> set[int]:
    """Special tokens that end a turn by their text (llama.cpp's end-of-generation set)."""
    added = backend.get_added_tokens_decoder().items()
    return {i for i, t in added if t.special and t.content in _END_OF_TURN_TEXTS}
