"""GGUF metadata -> the config.json-style dict an HF checkpoint would carry.

llama.cpp stores a model's shape under "{arch}.*" keys; this maps them onto the HF names
the architecture config dataclasses read, checks every value (the metadata is only as good
as the file), and names the file's quantization. Knows nothing of tensor data. Reference:
llama.cpp's `convert_hf_to_gguf.py`, which writes these keys.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from gguf.constants import LlamaFileType

from pocketlm.errors import CorruptModelError, PocketLMError

if TYPE_CHECKING:
    from pocketlm.weights.gguf import GGUFTensorInfo

# HF config key -> GGUF key under "{arch}."; all required.
_LLAMA_CONFIG_KEYS = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "max_position_embeddings": "context_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
}
_GPT2_CONFIG_KEYS = {
    "n_embd": "embedding_length",
    "n_layer": "block_count",
    "n_head": "attention.head_count",
    "n_positions": "context_length",
    "layer_norm_epsilon": "attention.layer_norm_epsilon",
}
# "{arch}.rope.scaling.X" -> HF rope_scaling key
_ROPE_SCALING_KEYS = {
    "factor": "factor",
    "original_context_length": "original_max_position_embeddings",
    "attn_factor": "attention_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}
_TORCH_DTYPES = {"F16": "float16", "BF16": "bfloat16"}


def _llama_config(arch: str, meta: dict[str, Any], *, tensors: dict, path: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = {"model_type": arch}
    cfg.update({hf: meta.get(f"{arch}.{key}") for hf, key in _LLAMA_CONFIG_KEYS.items()})
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    cfg["num_key_value_heads"] = meta.get(f"{arch}.attention.head_count_kv", heads)
    default_head_dim = hidden // heads if _is_int(heads) and _is_int(hidden) else None
    cfg["head_dim"] = meta.get(f"{arch}.attention.key_length", default_head_dim)
    cfg["rope_theta"] = meta.get(f"{arch}.rope.freq_base", 10000.0)
    cfg["vocab_size"] = _vocab_size(arch, meta, tensors=tensors)
    cfg["tie_word_embeddings"] = "output.weight" not in tensors
    cfg["rope_scaling"] = _rope_scaling(arch, meta)
    cfg["sliding_window"] = meta.get(f"{arch}.attention.sliding_window")
    cfg["attention_bias"] = arch == "qwen2" or "blk.0.attn_q.bias" in tensors
    cfg["torch_dtype"] = _TORCH_DTYPES.get(_dominant_type(tensors), "float32")
    cfg.update(_token_ids(meta))
    rope_dims = meta.get(f"{arch}.rope.dimension_count", cfg["head_dim"])
    if rope_dims != cfg["head_dim"]:
        raise PocketLMError(
            f"{path} rotates {rope_dims!r} of {cfg['head_dim']!r} head dimensions "
            "(partial RoPE), which pocketlm's Llama does not support"
        )
    return cfg


def _gpt2_config(meta: dict[str, Any], *, tensors: dict) -> dict[str, Any]:
    cfg: dict[str, Any] = {"model_type": "gpt2"}
    cfg.update({hf: meta.get(f"gpt2.{key}") for hf, key in _GPT2_CONFIG_KEYS.items()})
    cfg["n_ctx"] = cfg["n_positions"]
    cfg["n_inner"] = meta.get("gpt2.feed_forward_length")
    cfg["vocab_size"] = _vocab_size("gpt2", meta, tensors=tensors)
    cfg["tie_word_embeddings"] = "output.weight" not in tensors
    cfg["torch_dtype"] = _TORCH_DTYPES.get(_dominant_type(tensors), "float32")
    cfg.update(_token_ids(meta))
    return cfg


def _vocab_size(arch: str, meta: dict[str, Any], *, tensors: dict) -> Any:
    if f"{arch}.vocab_size" in meta:
        return meta[f"{arch}.vocab_size"]
    if "token_embd.weight" in tensors:
        return tensors["token_embd.weight"].shape[0]
    return len(meta.get("tokenizer.ggml.tokens", []))


def _rope_scaling(arch: str, meta: dict[str, Any]) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    linear = meta.get(f"{arch}.rope.scale_linear")  # the older key for linear scaling
    if kind in (None, "none") and linear not in (None, 1.0):
        return {"rope_type": "linear", "factor": linear}
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind}
    for key, hf in _ROPE_SCALING_KEYS.items():
        if f"{arch}.rope.scaling.{key}" in meta:
            scaling[hf] = meta[f"{arch}.rope.scaling.{key}"]
    return scaling


def _token_ids(meta: dict[str, Any]) -> dict[str, Any]:
    ids = {
        "bos_token_id": "tokenizer.ggml.bos_token_id",
        "eos_token_id": "tokenizer.ggml.eos_token_id",
        "pad_token_id": "tokenizer.ggml.padding_token_id",
    }
    return {hf: meta[key] for hf, key in ids.items() if type(meta.get(key)) is int}


# (positive ints, positive finite floats, of those the ones that may be None)
_CONFIG_CHECKS = {
    "gpt2": (
        ("n_embd", "n_layer", "n_head", "n_positions", "n_inner", "vocab_size"),
        ("layer_norm_epsilon",),
        ("n_inner",),
    ),
    "llama": (
        (*(k for k in _LLAMA_CONFIG_KEYS if k != "rms_norm_eps"), "num_key_value_heads",
         "head_dim", "vocab_size", "sliding_window"),
        ("rms_norm_eps", "rope_theta"),
        ("sliding_window",),
    ),
}  # fmt: skip


def _is_int(v: Any) -> bool:
    return type(v) is int and 0 < v < 1 << 31


def _is_positive(v: Any) -> bool:
    return type(v) in (int, float) and 0 < v < math.inf


def _check_config(cfg: dict[str, Any], path: Path) -> None:
    """Every size a positive int, every float finite: the metadata is only as good as the file."""
    gpt2 = cfg["model_type"] == "gpt2"
    ints, floats, optional = _CONFIG_CHECKS["gpt2" if gpt2 else "llama"]
    for key in ints:
        if not _is_int(cfg[key]) and not (key in optional and cfg[key] is None):
            _bad_config(path, key, cfg[key])
    for key in floats:
        if not _is_positive(cfg[key]):
            _bad_config(path, key, cfg[key])
    if scaling := cfg.get("rope_scaling"):
        kind, *numbers = scaling.values()  # rope_type first
        if not isinstance(kind, str) or not all(_is_positive(v) for v in numbers):
            _bad_config(path, "rope_scaling", scaling)
    if gpt2:
        if cfg["n_embd"] % cfg["n_head"]:
            _bad_config(path, "n_head", cfg["n_head"])
    elif cfg["head_dim"] % 2 or cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        _bad_config(
            path, "head_dim / num_key_value_heads", (cfg["head_dim"], cfg["num_key_value_heads"])
        )


def _bad_config(path: Path, key: str, value: Any) -> NoReturn:
    raise CorruptModelError(
        f"{path}: the GGUF metadata gives {key} = {value!r}, which is missing or invalid; "
        "download it again or re-convert it with llama.cpp"
    )


def _dominant_type(tensors: dict[str, GGUFTensorInfo]) -> str:
    """The ggml type holding most of the weights of the matrices (1-D norms stay F32)."""
    counts: dict[str, int] = {}
    for t in tensors.values():
        if len(t.shape) >= 2:
            counts[t.ggml_type] = counts.get(t.ggml_type, 0) + math.prod(t.shape)
    return max(counts, key=counts.__getitem__) if counts else "F32"


def _quantization(meta: dict[str, Any], tensors: dict[str, GGUFTensorInfo]) -> str:
    try:
        name = LlamaFileType(meta["general.file_type"]).name
    except (KeyError, ValueError, TypeError):
        return _dominant_type(tensors)
    return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")


def gguf_config(arch: str, meta: dict[str, Any], *, tensors: dict, path: Path) -> dict[str, Any]:
    """The checked HF-style config for a GGUF of a supported architecture."""
    if arch == "gpt2":
        config = _gpt2_config(meta, tensors=tensors)
    else:
        config = _llama_config(arch, meta, tensors=tensors, path=path)
    _check_config(config, path)
    return config


def quantization(meta: dict[str, Any], tensors: dict[str, GGUFTensorInfo]) -> str:
    """The file type's name (Q4_K_M, Q8_0...), or the dominant matrix type without one."""
    return _quantization(meta, tensors)
