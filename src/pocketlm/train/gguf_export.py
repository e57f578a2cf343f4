"""A model (a fine-tune in the store, an HF folder, a GGUF) -> one GGUF file, so that
llama.cpp and Ollama run it too: `pocketlm export NAME --gguf`.

Written with the `gguf` library's GGUFWriter, the way llama.cpp's `convert_hf_to_gguf.py`
writes its files: the same tensor names (read backwards from the loader's own table,
`weights/gguf_tables.py`), the same `{arch}.*` keys (from `weights/gguf_config.py`'s table),
Llama's q/k rows interleaved per head as llama.cpp's rotary expects (the loader undoes
exactly this), 1-D tensors in F32, the matrices in F32, F16, BF16 or Q8_0.

The tokenizer: a model that came from a GGUF (the embedded SmolLM2, or a fine-tune of it,
which the store records as `finetuned_from`) gets that file's `tokenizer.*` keys verbatim,
so llama.cpp tokenizes exactly as it did the original; otherwise a byte-level BPE is
written from the model's tokenizer.json (tokens, merges, token types, special ids, chat
template). Families: GPT-2 and the Llama-like ones llama.cpp names llama, qwen2 and qwen3
(Llama, Mistral, SmolLM/SmolLM2, Qwen2/2.5, Qwen3) without rope scaling; others are
refused in one line. Knows nothing of training loops.
"""

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocketlm.errors import PocketLMError
from pocketlm.weights import loader, sources, store
from pocketlm.weights.gguf import read_gguf
from pocketlm.weights.gguf_config import PERMUTED_QK, required_keys
from pocketlm.weights.gguf_tables import table

# HF model_type -> the architecture llama.cpp's converter writes for it.
ARCHITECTURES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "qwen2",
                 "qwen3": "qwen3"}  # fmt: skip
TYPES = ("f32", "f16", "bf16", "q8_0")
_TOKEN_TYPES = {"normal": 1, "control": 3, "user_defined": 4, "unused": 5}
# llama.cpp's LlamaFileType (general.file_type): the type of most of the file's matrices.
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}


def export_gguf(source: str | None, out: Path, *, qtype: str = "f16") -> Path:
    """Write the model `source` (a name or path, as `pocketlm run` takes) to `out`."""
    import gguf

    if qtype not in TYPES:
        raise PocketLMError(f"--type {qtype} is not one of {', '.join(TYPES)}")
    path = sources.resolve(source, offline=True)
    loaded = loader.load(path, dtype=torch.float32)
    config, model_type = loaded.config, loaded.config["model_type"]
    arch = ARCHITECTURES.get(model_type)
    if arch is None or not loaded.native or config.get("rope_scaling"):
        what = "rope scaling" if arch else f"model_type {model_type}"
        raise PocketLMError(
            f"GGUF export does not handle {what} yet (it writes {', '.join(ARCHITECTURES)} "
            "without rope scaling): export the HF folder with llama.cpp's convert_hf_to_gguf.py"
        )
    out = Path(out).expanduser()
    partial = out.with_name(f".{out.name}.partial")  # renamed into place once whole
    writer = gguf.GGUFWriter(str(partial), arch)
    writer.add_name(Path(str(source or path.stem)).name)
    writer.add_file_type(_FILE_TYPES[qtype])
    _add_config(writer, arch, config)
    tokenizer_keys = _base_gguf_tokenizer(path)
    if tokenizer_keys is not None:
        for key, value in tokenizer_keys.items():
            _add_value(writer, key, value)
    else:
        _add_bpe_tokenizer(writer, loaded.tokenizer, config)
    for name, tensor in _tensors(loaded.model, arch, config):
        _add_tensor(writer, name, tensor, qtype)
    if qtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    partial.replace(out)
    return out


def _add_config(writer: Any, arch: str, config: dict[str, Any]) -> None:
    """The `{arch}.*` keys the loader reads (and llama.cpp needs), from config.json."""
    for hf_key, gguf_key in required_keys(arch).items():
        value = config[hf_key]
        _add_value(writer, f"{arch}.{gguf_key}", value)
    if arch == "gpt2":
        hidden = config["n_embd"]
        writer.add_feed_forward_length(config.get("n_inner") or 4 * hidden)
        return
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])


def _add_value(writer: Any, key: str, value: Any) -> None:
    """One metadata value, typed as llama.cpp's files type it."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise PocketLMError(f"cannot write metadata {key} = {value!r} to a GGUF")


def _base_gguf_tokenizer(path: Path) -> dict[str, Any] | None:
    """The `tokenizer.*` keys of the GGUF this model is, or was fine-tuned from."""
    for _ in range(8):  # a fine-tune of a fine-tune...: follow the store's records
        if path.suffix == ".gguf":
            meta = read_gguf(path).metadata
            return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
        base = store.read_metadata(path).get("finetuned_from") if path.is_dir() else None
        if not base:
            return None
        try:
            path = sources.resolve(base, offline=True)
        except PocketLMError:
            return None  # the base is gone: fall back to the tokenizer.json
    return None


def _add_bpe_tokenizer(writer: Any, tokenizer: Any, config: dict[str, Any]) -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's "gpt2" tokenizer model."""
    # The tokenizers backend is the complete description; Tokenizer keeps it private.
    spec = json.loads(tokenizer._backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or not _is_byte_level(spec.get("pre_tokenizer")):
        raise PocketLMError(
            "GGUF export writes byte-level BPE tokenizers only; this model's is "
            f"{model.get('type')}: export the HF folder with llama.cpp's convert_hf_to_gguf.py"
        )
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["content"] for t in spec.get("added_tokens", [])}
    size = max(config["vocab_size"], max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [_TOKEN_TYPES["unused"]] * size
    for token, i in vocab.items():
        tokens[i] = token
        kind = "control" if token in special else "user_defined" if token in added else "normal"
        types[i] = _TOKEN_TYPES[kind]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    # GPT-2's own split rule: the loader and llama.cpp both know it by this name.
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unknown", "padding"):
        short = {"unknown": "unk", "padding": "pad"}.get(kind, kind)
        token_id = config.get(f"{short}_token_id")
        if not isinstance(token_id, int) and f"{short}_token" in tokenizer.special_tokens:
            token_id = vocab.get(tokenizer.special_tokens[f"{short}_token"])
        if isinstance(token_id, int):
            writer.add_uint32(f"tokenizer.ggml.{kind}_token_id", token_id)
    if tokenizer.add_bos:  # llama.cpp's default for a BPE vocabulary is not to
        writer.add_add_bos_token(True)
    if config["model_type"] != "gpt2":
        writer.add_add_space_prefix(False)  # byte-level BPE: no SentencePiece-style prefix
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _is_byte_level(pre: dict | None) -> bool:
    """GPT-2's pre-tokenizer: ByteLevel with its own split regex (alone, as GPT-2 has it)."""
    return bool(pre) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def _tensors(model: torch.nn.Module, arch: str, config: dict[str, Any]):
    """(GGUF name, float32 tensor) for every weight, as llama.cpp lays it out."""
    names = _names_from_ours(arch)
    tied = config.get("tie_word_embeddings", arch == "gpt2")
    for ours, tensor in model.state_dict().items():
        if tied and ours == "lm_head.weight":
            continue  # llama.cpp ties the head to token_embd when output.weight is absent
        match = next(((p, t) for p, t in names if p.fullmatch(ours)), None)
        if match is None:
            raise PocketLMError(f"GGUF export has no llama.cpp name for the tensor {ours}")
        pattern, template = match
        name = template.replace("{i}", pattern.fullmatch(ours)["i"] or "")
        tensor = tensor.detach().float().cpu()
        heads = _permuted_heads(arch, template, config)
        yield name, _permute(tensor, heads) if heads else tensor


def _names_from_ours(arch: str) -> list[tuple[re.Pattern, str]]:
    """The loader's table backwards: a pattern over our names -> the GGUF name template."""
    out = []
    for template, (ours, _shape) in table(arch, {}).items():
        if isinstance(ours, str) and "{e}" not in ours:
            parts = ours.split("{i}")
            pattern = "(?P<i>\\d+)".join(re.escape(p) for p in parts)
            out.append((re.compile(pattern if "{i}" in ours else f"{pattern}(?P<i>)"), template))
    return out


def _permuted_heads(arch: str, template: str, config: dict[str, Any]) -> int | None:
    if arch not in PERMUTED_QK:
        return None
    if template.startswith("blk.{i}.attn_q."):
        return config["num_attention_heads"]
    if template.startswith("blk.{i}.attn_k."):
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


def _permute(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf's `permute`: each head's rows (2, pair) -> (pair, 2), the
    rotary halves interleaved as llama.cpp rotates them (weights.gguf._unpermute undoes it)."""
    rows = x.shape[0]
    return x.reshape(n_heads, 2, rows // n_heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _add_tensor(writer: Any, name: str, tensor: torch.Tensor, qtype: str) -> None:
    import gguf

    data = tensor.numpy()
    if data.ndim == 1 or qtype == "f32":
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    elif qtype == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        kind = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
        if qtype == "q8_0" and data.shape[-1] % 32:
            writer.add_tensor(name, data.astype(np.float16))  # rows Q8_0's blocks cannot cut
            return
        packed = gguf.quants.quantize(np.ascontiguousarray(data), kind[qtype])
        writer.add_tensor(name, packed, raw_dtype=kind[qtype])
