"""A tokenizer from a Hugging Face folder: tokenizer.json (or vocab.json + merges.txt) and
the optional tokenizer_config.json, special_tokens_map.json, chat_template.jinja / .json,
config.json and generation_config.json, read the way transformers reads them.

The tokenizer itself is whatever tokenizer.json describes, run by the `tokenizers` library;
this module only gathers BOS/EOS, the chat template and the named special tokens around it.
It knows nothing of GGUF files, models or weights.

References: transformers `PreTrainedTokenizerFast` / `GPT2TokenizerFast` (defaults for a bare
vocab.json + merges.txt), `tokenization_utils_base` (tokenizer_config.json keys).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from pocketlm.errors import CorruptModelError, PocketLMError
from pocketlm.tokenizer.common import (
    NAMED_SPECIALS,
    Parts,
    end_of_turn_ids,
    ids,
    is_id,
    one_line,
    special_texts,
)
from pocketlm.tokenizer.decoding import spec, steps


def read_folder(path: str | Path) -> Parts:
    """The tokenizer of a Hugging Face model folder."""
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
            (c["bos_token_id"] for c in model_configs if is_id(c.get("bos_token_id"))), None
        )
    eos = {i for c in model_configs for i in ids(c.get("eos_token_id"))}
    eos |= {i for i in [_token_id(backend, names.get("eos_token"))] if i is not None}
    eos |= end_of_turn_ids(special_texts(backend))
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        add_bos = _post_processor_adds(spec(backend.post_processor), bos_id)
    eos_id = _token_id(backend, names.get("eos_token"))
    return Parts(
        backend,
        bos_id=bos_id,
        eos_ids=frozenset(eos),
        add_bos=bool(add_bos) and bos_id is not None,
        eos_suffix=eos_id if config.get("add_eos_token") is True else None,
        chat_template=_chat_template(folder, config),
        special_tokens=names,
    )


def gpt2_backend(vocab: Path, merges: Path) -> Backend:
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
                f"{file} cannot be read as a tokenizer ({one_line(error)})"
            ) from None
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        try:
            return gpt2_backend(folder / "vocab.json", folder / "merges.txt"), True
        except Exception as error:
            raise CorruptModelError(
                f"{folder}/vocab.json + merges.txt cannot be read ({one_line(error)})"
            ) from None
    raise PocketLMError(
        f"no tokenizer in {folder}: expected tokenizer.json, or vocab.json + merges.txt "
        "(with an optional tokenizer_config.json)"
    )


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


def _post_processor_adds(entry: dict | None, bos_id: int | None) -> bool:
    """Whether tokenizer.json's post-processor puts BOS first (Llama 3 adds BOS this way)."""
    for step in steps(entry):
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0].get("SpecialToken", {}).get("id")
            found = step.get("special_tokens", {}).get(first, {}).get("ids")
            if found and found[0] == bos_id:
                return True
    return False


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
    values = {n: _content(config.get(n)) or _content(legacy_map.get(n)) for n in NAMED_SPECIALS}
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


def _token_id(backend: Backend, token: str | None) -> int | None:
    return None if token is None else backend.token_to_id(token)
