"""A tokenizer from a GGUF file's metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`),
built the way llama.cpp reads it, as a plain dict.

`tokenizer.ggml.model` says which kind: "gpt2" (byte-level BPE, cut into words as
`tokenizer.ggml.pre` names, see `pocketlm.tokenizer.pretokenize`), "llama" (SentencePiece:
pieces and scores, see `pocketlm.tokenizer.spm`) or "gemma4" (BPE over SentencePiece-style
pieces). Encoder vocabularies (BERT's WordPiece, T5's Unigram) are refused with the reason:
pocketlm runs causal language models. Token types decide what is matched whole in text:
control and unknown tokens as special tokens, user-defined ones as plain added tokens, as
llama.cpp's `parse_special` tokenization does. Knows nothing of files, models or weights.

Reference: llama.cpp `src/llama-vocab.cpp` (`load`: the defaults of each kind, token types,
end-of-generation tokens, per-token attributes; `tokenize`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as Backend

from pocketlm.errors import CorruptModelError, PocketLMError
from pocketlm.tokenizer.common import END_OF_TURN_TEXTS, Parts, end_of_turn_ids, is_id, one_line
from pocketlm.tokenizer.decoding import bytes_to_unicode
from pocketlm.tokenizer.pretokenize import Split, pre_tokenizer, split_for
from pocketlm.tokenizer.spm import score_merges, spm_bpe_backend

# llama.cpp's token types (gguf-py `TokenType`).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_ADDED = (UNKNOWN, CONTROL, USER_DEFINED)  # matched whole in text, decoded as their own text

# Vocabulary kinds pocketlm does not build, and why.
_REFUSED = {
    "bert": "is BERT's WordPiece, the vocabulary of an encoder (embedding) model",
    "t5": "is T5's Unigram, the vocabulary of an encoder-decoder model",
    "whitespace": "splits at whitespace for an encoder (embedding) model",
    "none": "means the file has no vocabulary",
    "no_vocab": "means the file has no vocabulary",
}
_NOT_CAUSAL = " pocketlm runs causal language models (GPT-2, Llama, Qwen, Gemma, Phi, ...)"
# Named special tokens (as chat templates see them) -> GGUF id keys.
_NAMED = {"bos_token": "bos_token_id", "eos_token": "eos_token_id"}
_NAMED |= {"unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


@dataclass(frozen=True)
class _Vocab:
    tokens: list[str]
    types: list[int]
    scores: list[float]
    ids: dict[str, int]  # what each id is looked up by in the BPE model


@dataclass(frozen=True)
class _Defaults:
    """What llama.cpp assumes where the file is silent."""

    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = False
    bos_always: bool = False


_SPM_DEFAULTS = _Defaults(bos_id=1, eos_id=2, unk_id=0, add_bos=True)


def read_metadata(meta: Mapping[str, Any]) -> Parts:
    """The tokenizer a GGUF file's metadata describes."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        vocab = _read_vocab(meta, byte_level=False)
        backend, defaults = _spm_backend(meta, vocab), _SPM_DEFAULTS
    elif kind in ("gpt2", "gemma4"):
        pre = "gemma4" if kind == "gemma4" else meta.get("tokenizer.ggml.pre", "default")
        if not isinstance(pre, str):
            raise CorruptModelError("the GGUF's tokenizer.ggml.pre is not a string")
        split = split_for(pre)
        vocab = _read_vocab(meta, byte_level=split.byte_level)
        backend = _bpe_backend(meta, vocab, split)
        defaults = _Defaults(add_bos=split.add_bos, bos_always=split.bos_always)
    elif isinstance(kind, str) and kind in _REFUSED:
        raise PocketLMError(f"GGUF tokenizer model {kind!r} {_REFUSED[kind]};{_NOT_CAUSAL}")
    else:
        raise PocketLMError(
            f"GGUF tokenizer model {kind!r} is not supported (pocketlm reads 'gpt2' byte-level "
            "BPE, 'llama' SentencePiece and 'gemma4'); use the model's Hugging Face folder instead"
        )
    _add_tokens(backend, vocab, meta)
    return _parts(meta, vocab, backend, defaults)


# -- the vocabulary ---------------------------------------------------------------------------


def _read_vocab(meta: Mapping[str, Any], *, byte_level: bool) -> _Vocab:
    """Tokens, types and scores, checked; a byte-level vocabulary's normal tokens spelled in
    GPT-2's byte alphabet (transformers respells one written in plain text)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or set(map(type, tokens)) - {str}:
        raise CorruptModelError("the GGUF's tokenizer.ggml.tokens is missing or not strings")
    n = len(tokens)
    types = (_numbers(meta, "token_type", n, integral=True) or [NORMAL] * n)[:n]
    scores = (_numbers(meta, "scores", n, integral=False) or [0.0] * n)[:n]
    # llama.cpp names an empty token rather than lose its id.
    tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    ids: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if ids.setdefault(token, i) != i:
            raise CorruptModelError(f"the GGUF's vocabulary holds {token!r} twice")
    if byte_level:
        _respell(ids, tokens, types)
    return _Vocab(tokens, types, scores, ids)


def _respell(ids: dict[str, int], tokens: list[str], types: list[int]) -> None:
    """Look a normal token written in plain text up by its GPT-2 byte-alphabet spelling, the
    one BPE meets (transformers respells it too); unless that spelling is taken already."""
    spell = bytes_to_unicode()
    alphabet = set(spell.values())
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind not in _ADDED and not set(token) <= alphabet:
            respelled = "".join(spell[b] for b in token.encode("utf-8"))
            if respelled not in ids:  # else it stays as written, and can only be decoded
                del ids[token]
                ids[respelled] = i


def _numbers(meta: Mapping[str, Any], key: str, n: int, *, integral: bool) -> list | None:
    """tokenizer.ggml.<key>: absent (None), or at least one number per token."""
    values = meta.get(f"tokenizer.ggml.{key}")
    if values is None:
        return None
    if not isinstance(values, list) or len(values) < n:
        raise CorruptModelError(f"the GGUF's tokenizer.ggml.{key} has fewer entries than tokens")
    kind = numbers.Integral if integral else numbers.Real
    # One check per Python type present, not per value: vocabularies run to 262k entries.
    if not all(issubclass(t, kind) and t is not bool for t in set(map(type, values))):
        raise CorruptModelError(f"the GGUF's tokenizer.ggml.{key} holds non-numbers")
    return values


def _merges(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    """tokenizer.ggml.merges as pairs, cut at the first space after the first character
    (as llama.cpp cuts them: a token may begin with a space)."""
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list) or set(map(type, merges)) - {str}:
        raise CorruptModelError("the GGUF's tokenizer.ggml.merges is missing or not strings")
    cuts = [merge.find(" ", 1) for merge in merges]
    if -1 in cuts:
        raise CorruptModelError(f"the GGUF's merge {merges[cuts.index(-1)]!r} is not two tokens")
    return [(merge[:cut], merge[cut + 1 :]) for merge, cut in zip(merges, cuts, strict=True)]


# -- backends ---------------------------------------------------------------------------------


def _bpe_backend(meta: Mapping[str, Any], vocab: _Vocab, split: Split) -> Backend:
    merges = _merges(meta)
    try:
        if split.byte_level:
            model = models.BPE(vocab.ids, merges, ignore_merges=split.ignore_merges)
            backend = Backend(model)
            backend.decoder = decoders.ByteLevel()
        else:
            backend = spm_bpe_backend(
                vocab.ids,
                merges,
                unk_token=None,
                add_space_prefix=False,
                ignore_merges=split.ignore_merges,
            )
    except Exception as error:  # tokenizers raises a bare Exception on merges it cannot use
        raise CorruptModelError(f"the GGUF's BPE merges are unusable ({one_line(error)})") from None
    backend.pre_tokenizer = pre_tokenizer(split)
    return backend


def _spm_backend(meta: Mapping[str, Any], vocab: _Vocab) -> Backend:
    unk_id = _token_id(meta, "unknown_token_id", len(vocab.tokens), _SPM_DEFAULTS.unk_id)
    add_space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    return spm_bpe_backend(
        vocab.ids,
        score_merges(vocab.tokens, vocab.scores, vocab.ids),
        unk_token=None if unk_id is None else vocab.tokens[unk_id],
        add_space_prefix=add_space_prefix is not False,
    )


def _add_tokens(backend: Backend, vocab: _Vocab, meta: Mapping[str, Any]) -> None:
    """Control and unknown tokens become special tokens, user-defined ones plain added
    tokens: both are matched whole in text before any splitting, as llama.cpp does."""
    rstrip = _rstrip_rule(meta)
    special, plain = [], []
    for token, kind in zip(vocab.tokens, vocab.types, strict=True):
        if kind in _ADDED:
            added = AddedToken(
                token, special=kind != USER_DEFINED, normalized=False, rstrip=rstrip(token)
            )
            (plain if kind == USER_DEFINED else special).append(added)
    backend.add_special_tokens(special)
    backend.add_tokens(plain)


def _rstrip_rule(meta: Mapping[str, Any]) -> Callable[[str], bool]:
    """Whether whitespace after a special token is dropped. llama.cpp knows this for Phi-3
    alone, by the model's name, as its tokenizer.json says (the GGUF has no field for it)."""
    name = meta.get("general.name")
    if isinstance(name, str) and ("phi-3" in name.lower() or "phi3" in name.lower()):
        return lambda token: token not in ("<unk>", "<s>", "<|endoftext|>")
    return lambda token: False


# -- ids around the vocabulary ----------------------------------------------------------------


def _token_id(meta: Mapping[str, Any], key: str, n: int, default: int | None) -> int | None:
    """tokenizer.ggml.<key> if it names a token, else llama.cpp's default for the kind."""
    value = meta.get(f"tokenizer.ggml.{key}")
    if is_id(value) and value < n:
        return int(value)
    return default if default is not None and default < n else None


def _parts(meta: Mapping[str, Any], vocab: _Vocab, backend: Backend, defaults: _Defaults) -> Parts:
    n = len(vocab.tokens)
    bos_id = _token_id(meta, "bos_token_id", n, defaults.bos_id)
    eos_id = _token_id(meta, "eos_token_id", n, defaults.eos_id)
    known = {"bos_token_id": bos_id, "eos_token_id": eos_id, "unknown_token_id": defaults.unk_id}
    found = {name: _token_id(meta, key, n, known.get(key)) for name, key in _NAMED.items()}
    names = {name: vocab.tokens[i] for name, i in found.items() if i is not None}
    ends = {_token_id(meta, k, n, None) for k in ("eot_token_id", "eom_token_id")} | {eos_id}
    texts = {i: t for i, t in enumerate(vocab.tokens) if t in END_OF_TURN_TEXTS}
    add_bos = _flag(meta, "add_bos_token", defaults.add_bos) or defaults.bos_always
    template = meta.get("tokenizer.chat_template")
    return Parts(
        backend,
        bos_id=bos_id,
        eos_ids=frozenset((ends - {None}) | end_of_turn_ids(texts)),
        add_bos=add_bos and bos_id is not None,
        eos_suffix=eos_id if _flag(meta, "add_eos_token", False) else None,
        chat_template=template if isinstance(template, str) else None,
        special_tokens=names,
    )


def _flag(meta: Mapping[str, Any], key: str, default: bool) -> bool:
    value = meta.get(f"tokenizer.ggml.{key}")
    return value if isinstance(value, bool) else default
