"""GGUF metadata -> the config.json-style dict an HF checkpoint would carry.

llama.cpp stores a model's shape under "{arch}.*" keys; this maps them onto the HF names
the architecture config dataclasses read, has every value checked by the validator that
config.json goes through too (weights.config: the metadata is only as good as the file,
and a GGUF has no defaults for its shape), and names the file's quantization. Knows
nothing of tensor data, except the values of `rope_freqs.weight` that its caller hands in:
for Llama 3.1+ rope scaling the converter writes no rope.scaling.* keys but that tensor
of per-pair divisors of the frequencies, which becomes rope_scaling "freq_factors".
Gemma's keys (soft caps, sliding window and pattern, the sliding layers' rotary base) map
onto Gemma's HF names; what the converter leaves out is filled in as llama.cpp's own
loader does (src/models/gemma2.cpp, gemma3.cpp): the attention scale, which llama.cpp
takes as head_dim (hidden / heads for the 27B sizes) whatever query_pre_attn_scalar was,
and Gemma 2's window of 4096. Reference: llama.cpp's `convert_hf_to_gguf.py`
(conversion/base.py, llama.py and gemma.py), which writes these keys.
"""

import math
import reprlib
from pathlib import Path
from typing import Any

from gguf.constants import LlamaFileType

from pocketlm.errors import PocketLMError
from pocketlm.weights.config import check_config

# The tensor table as `gguf.read_gguf` parses it: name -> GGUFTensorInfo (.ggml_type,
# .shape). Typed loosely here so that this module does not import the parser that uses it.
TensorTable = dict[str, Any]

# HF config key -> GGUF key under "{arch}."; all required (a GGUF has no defaults for them).
_LLAMA_CONFIG_KEYS = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "max_position_embeddings": "context_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
}
# LayerNorm families: their eps under its config.json name (the rest as Llama's).
_LAYER_NORM_EPS = {"stablelm": "layer_norm_eps", "starcoder2": "norm_epsilon"}
_NEOX_CONFIG_KEYS = {
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "max_position_embeddings": "context_length",
    "layer_norm_eps": "attention.layer_norm_epsilon",
}
_FALCON_CONFIG_KEYS = {
    "hidden_size": "embedding_length",
    "ffn_hidden_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "max_position_embeddings": "context_length",
    "layer_norm_epsilon": "attention.layer_norm_epsilon",
}
_GPT2_CONFIG_KEYS = {
    "n_embd": "embedding_length",
    "n_layer": "block_count",
    "n_head": "attention.head_count",
    "n_positions": "context_length",
    "layer_norm_epsilon": "attention.layer_norm_epsilon",
}
# The same for keys a file may leave out (each has a default or is derived).
_OPTIONAL_KEYS = {
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "rope_theta": "rope.freq_base",
    "num_kv_heads": "attention.head_count_kv",  # Falcon's name
    "sliding_window": "attention.sliding_window",
    "vocab_size": "vocab_size",
    "n_inner": "feed_forward_length",
    "num_local_experts": "expert_count",
    "num_experts": "expert_count",
    "num_experts_per_tok": "expert_used_count",
    "moe_intermediate_size": "expert_feed_forward_length",
    "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
    "norm_topk_prob": "expert_weights_norm",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
    "rope_local_base_freq": "rope.freq_base_swa",
    "sliding_window_pattern": "attention.sliding_window_pattern",
    "layer_types": "attention.sliding_window_pattern",
}
# Whether llama.cpp renormalises the top-k expert weights of each architecture (its
# build_moe_ffn `norm_w`: the converter writes no key for it): qwen2moe does not.
_NORM_TOPK = {"llama": True, "qwen2moe": False, "qwen3moe": True}
_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")
# "{arch}.rope.scaling.X" -> HF rope_scaling key. The converter writes YaRN's
# attention_factor as yarn_attn_factor, Phi-3's LongRoPE one as attn_factor; YaRN's
# yarn_ext_factor (from an HF "extrapolation_factor") is a llama.cpp knob transformers
# does not have, so it is not read.
_ROPE_SCALING_KEYS = {
    "factor": "factor",
    "original_context_length": "original_max_position_embeddings",
    "attn_factor": "attention_factor",
    "yarn_attn_factor": "attention_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}
_TORCH_DTYPES = {"F16": "float16", "BF16": "bfloat16"}
# Architectures whose q/k rows llama.cpp's converter interleaves for its rotary layout
# (weights.gguf undoes it; Mistral is converted as "llama", SmolLM3's and Granite's
# converters are Llama's; Qwen2, Qwen3 and OLMo 2 are never permuted). It permutes whole
# heads, so all of each head must be rotated.
PERMUTED_QK = ("llama", "smollm3", "granite")
# Granite's multipliers: HF key -> GGUF key under "granite.". llama.cpp requires only the
# logit scale; without the others it scales nothing and attends with 1/sqrt(head_dim).
_GRANITE_KEYS = {
    "embedding_multiplier": "embedding_scale",
    "attention_multiplier": "attention.scale",
    "residual_multiplier": "residual_scale",
    "logits_scaling": "logit_scale",
}


def required_keys(arch: str) -> dict[str, str]:
    """HF config key -> GGUF key under "{arch}." of the values a file must give."""
    if arch == "gpt2":
        return _GPT2_CONFIG_KEYS
    if arch in ("gptneox", "falcon"):
        return _NEOX_CONFIG_KEYS if arch == "gptneox" else _FALCON_CONFIG_KEYS
    if arch in _LAYER_NORM_EPS:
        keys = {k: v for k, v in _LLAMA_CONFIG_KEYS.items() if k != "rms_norm_eps"}
        return keys | {_LAYER_NORM_EPS[arch]: "attention.layer_norm_epsilon"}
    return _LLAMA_CONFIG_KEYS


def _llama_config(arch: str, meta: dict[str, Any], *, tensors: TensorTable) -> dict[str, Any]:
    cfg: dict[str, Any] = {"model_type": _MODEL_TYPES.get(arch, arch)}
    cfg.update({hf: meta.get(f"{arch}.{key}") for hf, key in required_keys(arch).items()})
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    cfg["num_key_value_heads"] = meta.get(f"{arch}.attention.head_count_kv", heads)
    default_head_dim = hidden // heads if _is_int(heads) and _is_int(hidden) else None
    cfg["head_dim"] = meta.get(f"{arch}.attention.key_length", default_head_dim)
    cfg["rope_theta"] = meta.get(f"{arch}.rope.freq_base", 10000.0)
    cfg["vocab_size"] = _vocab_size(arch, meta, tensors=tensors)
    cfg["tie_word_embeddings"] = "output.weight" not in tensors
    cfg["rope_scaling"] = _rope_scaling(arch, meta)
    cfg["sliding_window"] = meta.get(f"{arch}.attention.sliding_window")
    if arch == "phi3" and cfg["sliding_window"] == 0:
        cfg["sliding_window"] = None  # the converter's "no window" (Phi-4-mini's config)
    cfg["attention_bias"] = arch == "qwen2" or "blk.0.attn_q.bias" in tensors
    cfg["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    cfg["partial_rotary_factor"] = _partial_rotary(arch, meta, cfg)
    cfg["torch_dtype"] = _TORCH_DTYPES.get(_dominant_type(tensors), "float32")
    cfg.update(_token_ids(meta))
    if arch.startswith("gemma"):
        _gemma_config(arch, meta, cfg)
    if arch == "stablelm":
        cfg["partial_rotary_factor"] = cfg["partial_rotary_factor"] or 1.0  # its default: 0.25
        cfg["use_qkv_bias"] = "blk.0.attn_q.bias" in tensors
        cfg["use_parallel_residual"] = meta.get("stablelm.use_parallel_residual", True)
    if arch == "starcoder2":
        cfg["use_bias"] = "blk.0.attn_q.bias" in tensors
    if arch == "gpt-oss":
        _gpt_oss_config(meta, cfg)
    elif arch in _NORM_TOPK and (arch != "llama" or meta.get("llama.expert_count")):
        cfg.update(_moe_config(arch, meta, tensors=tensors, layers=cfg["num_hidden_layers"]))
    if arch == "granite":
        cfg.update(_granite_multipliers(meta, head_dim=cfg["head_dim"]))
    return cfg


def _moe_config(
    arch: str, meta: dict[str, Any], *, tensors: TensorTable, layers: Any
) -> dict[str, Any]:
    """A mixture of experts' keys. A layer without a router is dense (mlp_only_layers)."""
    experts = meta.get(f"{arch}.expert_count")
    cfg: dict[str, Any] = {
        "model_type": "mixtral" if arch == "llama" else _MODEL_TYPES[arch],
        "num_local_experts" if arch == "llama" else "num_experts": experts,
        "num_experts_per_tok": meta.get(f"{arch}.expert_used_count"),
        "moe_intermediate_size": meta.get(f"{arch}.expert_feed_forward_length"),
        "shared_expert_intermediate_size": meta.get(f"{arch}.expert_shared_feed_forward_length"),
        "norm_topk_prob": meta.get(f"{arch}.expert_weights_norm", _NORM_TOPK[arch]),
        "qkv_bias": "blk.0.attn_q.bias" in tensors,
    }
    if _is_int(layers):
        routed = (i for i in range(min(layers, 1024)) if f"blk.{i}.ffn_gate_inp.weight" in tensors)
        cfg["mlp_only_layers"] = sorted(set(range(min(layers, 1024))) - set(routed))
    return cfg


def _granite_multipliers(meta: dict[str, Any], *, head_dim: Any) -> dict[str, Any]:
    """Granite's scales as HF names them, with llama.cpp's defaults for absent keys (the
    validator checks each value; the logit scale has no default: llama.cpp requires it)."""
    out = {hf: meta.get(f"granite.{key}") for hf, key in _GRANITE_KEYS.items()}
    out["embedding_multiplier"] = out["embedding_multiplier"] or 1.0
    out["residual_multiplier"] = out["residual_multiplier"] or 1.0
    if out["attention_multiplier"] in (None, 0) and _is_int(head_dim):  # llama.cpp: 0 unset
        out["attention_multiplier"] = head_dim**-0.5
    return out


def _neox_config(arch: str, meta: dict[str, Any], *, tensors: TensorTable) -> dict[str, Any]:
    """GPT-NeoX and Falcon: hidden / heads is the head size, q/k/v one fused tensor."""
    cfg: dict[str, Any] = {"model_type": _MODEL_TYPES.get(arch, arch)}
    cfg.update({hf: meta.get(f"{arch}.{key}") for hf, key in required_keys(arch).items()})
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    cfg["head_dim"] = hidden // heads if _is_int(heads) and _is_int(hidden) else None
    cfg["rope_theta"] = meta.get(f"{arch}.rope.freq_base", 10000.0)
    cfg["vocab_size"] = _vocab_size(arch, meta, tensors=tensors)
    cfg["tie_word_embeddings"] = "output.weight" not in tensors
    cfg["torch_dtype"] = _TORCH_DTYPES.get(_dominant_type(tensors), "float32")
    cfg.update(_token_ids(meta))
    if arch == "gptneox":
        # A quarter is GPT-NeoX's default: a file that rotates whole heads must say 1.
        cfg["partial_rotary_factor"] = _partial_rotary(arch, meta, cfg) or 1.0
        cfg["use_parallel_residual"] = meta.get("gptneox.use_parallel_residual", True)
        cfg["attention_bias"] = "blk.0.attn_qkv.bias" in tensors
    else:
        # llama.cpp runs every Falcon as attention and MLP in parallel, K/V heads grouped
        # as the new architecture does (old multi-query is one group), with a LayerNorm
        # for each (ln_attn, ln_mlp) where the file has attn_norm_2, else one for both.
        cfg["new_decoder_architecture"] = True
        cfg["num_kv_heads"] = meta.get("falcon.attention.head_count_kv", heads)
        cfg["num_ln_in_parallel_attn"] = 2 if "blk.0.attn_norm_2.weight" in tensors else 1
        cfg["bias"] = "blk.0.attn_qkv.bias" in tensors
    return cfg


def _gpt_oss_config(meta: dict[str, Any], cfg: dict[str, Any]) -> None:
    """GPT-OSS's keys. llama.cpp writes no layer types (it slides every even layer, as
    HF's default does), no SwiGLU clamp (HF's defaults) and rotary scaling only where the
    checkpoint has one, so a file without it says "default" (GptOssConfig's own default
    is YaRN). GPT-OSS's YaRN does not round its correction range to whole dimensions
    (HF's truncate false, as OpenAI's reference); no key says so, and llama.cpp rounds it
    for every model, so a file's GPT-OSS rotates here as transformers rotates the model."""
    cfg["num_local_experts"] = meta.get("gpt-oss.expert_count")
    cfg["num_experts_per_tok"] = meta.get("gpt-oss.expert_used_count")
    cfg["intermediate_size"] = meta.get("gpt-oss.expert_feed_forward_length")
    scaling = cfg.pop("rope_scaling") or {"rope_type": "default"}
    if scaling["rope_type"] == "yarn":
        scaling["truncate"] = False
    cfg["rope_parameters"] = {**scaling, "rope_theta": cfg["rope_theta"]}


def _partial_rotary(arch: str, meta: dict[str, Any], cfg: dict[str, Any]) -> float | None:
    """The share of each head that rotary rotates, where the file rotates only part of it
    (rope.dimension_count below the head size), as HF's partial_rotary_factor."""
    rope_dims, head_dim = meta.get(f"{arch}.rope.dimension_count"), cfg["head_dim"]
    if not _is_int(rope_dims) or not _is_int(head_dim) or rope_dims >= head_dim:
        return None
    # Half a dimension over, so that HF's int(head_dim * factor) gives rope_dims back
    # exactly (rope_dims / head_dim alone can land a hair under it: 44 * (30 / 44) < 30).
    return (rope_dims + 0.5) / head_dim


# GGUF architecture -> the model_type pocketlm's config reads (llama.cpp's "gemma3" is
# HF's text-only Gemma 3; the image-text "gemma3" of HF has its text under text_config).
# A "llama" file with experts is a Mixtral (llama.cpp converts Mixtral as llama).
_MODEL_TYPES = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
                "gptneox": "gpt_neox", "gpt-oss": "gpt_oss"}  # fmt: skip
# llama.cpp's block counts of the 27B Gemma 2 and 3, whose attention scale is
# 1/sqrt(hidden / heads) rather than 1/sqrt(head_dim) (their query_pre_attn_scalar).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma_config(arch: str, meta: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Gemma's keys added to the Llama-like `cfg`, with llama.cpp's defaults for those
    the converter does not write."""
    cfg["model_type"] = _MODEL_TYPES.get(arch, arch)
    if arch == "gemma":
        return
    heads, hidden, head_dim = cfg["num_attention_heads"], cfg["hidden_size"], cfg["head_dim"]
    big = meta.get(f"{arch}.block_count") == _GEMMA_27B_LAYERS[arch]
    if big and _is_int(heads) and _is_int(hidden):
        cfg["query_pre_attn_scalar"] = hidden // heads
    else:
        cfg["query_pre_attn_scalar"] = head_dim
    cfg["final_logit_softcapping"] = meta.get(f"{arch}.final_logit_softcapping")
    window = meta.get(f"{arch}.attention.sliding_window", 4096 if arch == "gemma2" else None)
    cfg["sliding_window"] = window or None  # llama.cpp: a window of 0 is none
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # one flag per layer: whether it slides
        cfg["layer_types"] = [_LAYER_TYPE[bool(p)] for p in pattern]
    else:
        cfg["sliding_window_pattern"] = pattern if pattern is not None else (
            2 if arch == "gemma2" else 6
        )  # fmt: skip
        if arch == "gemma2":  # Gemma2Config reads no pattern: its layers are spelled out
            n, every = cfg["num_hidden_layers"], cfg["sliding_window_pattern"]
            if _is_int(n) and _is_int(every):
                cfg["layer_types"] = [_LAYER_TYPE[(i + 1) % every != 0] for i in range(n)]
    if arch == "gemma2":
        cfg["attn_logit_softcapping"] = meta.get(f"{arch}.attn_logit_softcapping")
    else:  # llama.cpp's default base of the sliding layers is 10000 (llama-hparams.h)
        cfg["rope_local_base_freq"] = meta.get(f"{arch}.rope.freq_base_swa", 10000.0)


_LAYER_TYPE = {True: "sliding_attention", False: "full_attention"}


def _check_heads(arch: str, meta: dict[str, Any], cfg: dict[str, Any], path: Path) -> None:
    """What pocketlm's Llama assumes of a head: its first dimensions rotated, in the order
    HF rotates them, and values as wide as keys."""
    rope_dims = meta.get(f"{arch}.rope.dimension_count", cfg["head_dim"])
    rotated = int(cfg["head_dim"] * (cfg.get("partial_rotary_factor") or 1.0))
    if rope_dims != rotated or (rope_dims != cfg["head_dim"] and arch in PERMUTED_QK):
        raise PocketLMError(
            f"{path} rotates {rope_dims!r} of {cfg['head_dim']!r} head dimensions "
            "in a way pocketlm does not support"
        )
    value_dims = meta.get(f"{arch}.attention.value_length", cfg["head_dim"])
    if value_dims != cfg["head_dim"]:
        raise PocketLMError(
            f"{path} has value heads of {value_dims!r} dimensions and key heads of "
            f"{cfg['head_dim']!r}, which pocketlm's Llama does not support"
        )


def _add_rope_freqs(cfg: dict[str, Any], factors: list[float], *, path: Path) -> None:
    """llama.cpp divides each pair's frequency by its factor (after any scaling the
    metadata names); pocketlm takes the factors alone, as Llama 3.1+ conversions give them."""
    if cfg["rope_scaling"] is not None:
        raise PocketLMError(
            f"{path} scales RoPE twice (rope_freqs.weight, and "
            f"{reprlib.repr(cfg['rope_scaling']['rope_type'])} scaling in its metadata), "
            "which pocketlm does not support"
        )
    cfg["rope_scaling"] = {"rope_type": "freq_factors", "factors": factors}


def _add_longrope(
    arch: str, cfg: dict[str, Any], meta: dict[str, Any], factors: dict[str, list[float]]
) -> None:
    """Phi-3's LongRoPE: the converter writes no rope.scaling.type but the short and long
    factors as tensors, the pretraining context and the attention factor it computed from
    max / original context as transformers does (conversion/phi.py)."""
    scaling = {"rope_type": "longrope", **factors}
    for key, hf in _ROPE_SCALING_KEYS.items():
        if f"{arch}.rope.scaling.{key}" in meta:
            scaling[hf] = meta[f"{arch}.rope.scaling.{key}"]
    cfg["rope_scaling"] = scaling


def _gpt2_config(meta: dict[str, Any], *, tensors: TensorTable) -> dict[str, Any]:
    cfg: dict[str, Any] = {"model_type": "gpt2"}
    cfg.update({hf: meta.get(f"gpt2.{key}") for hf, key in _GPT2_CONFIG_KEYS.items()})
    cfg["n_ctx"] = cfg["n_positions"]
    cfg["n_inner"] = meta.get("gpt2.feed_forward_length")
    cfg["vocab_size"] = _vocab_size("gpt2", meta, tensors=tensors)
    cfg["tie_word_embeddings"] = "output.weight" not in tensors
    cfg["torch_dtype"] = _TORCH_DTYPES.get(_dominant_type(tensors), "float32")
    cfg.update(_token_ids(meta))
    return cfg


def _vocab_size(arch: str, meta: dict[str, Any], *, tensors: TensorTable) -> Any:
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


def _dominant_type(tensors: TensorTable) -> str:
    """The ggml type holding most of the weights of the matrices (1-D norms stay F32)."""
    counts: dict[str, int] = {}
    for t in tensors.values():
        if len(t.shape) >= 2:
            counts[t.ggml_type] = counts.get(t.ggml_type, 0) + math.prod(t.shape)
    return max(counts, key=counts.__getitem__) if counts else "F32"


def _quantization(meta: dict[str, Any], tensors: TensorTable) -> str:
    try:
        name = LlamaFileType(meta["general.file_type"]).name
    except (KeyError, ValueError, TypeError):
        return _dominant_type(tensors)
    return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")


def gguf_config(
    arch: str,
    meta: dict[str, Any],
    *,
    tensors: TensorTable,
    path: Path,
    rope_freqs: list[float] | None = None,
    longrope: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """The HF-style config for a GGUF of a supported architecture, checked by the one
    config validator (weights.config), its messages naming the file's own keys.

    `rope_freqs`: the values of the file's `rope_freqs.weight` (Llama only), if it has one;
    `longrope`: Phi-3's rope_factors_long/short.weight values, as long_factor/short_factor."""
    if arch == "gpt2":
        config = _gpt2_config(meta, tensors=tensors)
    elif arch in ("gptneox", "falcon"):
        config = _neox_config(arch, meta, tensors=tensors)
    else:
        config = _llama_config(arch, meta, tensors=tensors)
    required = required_keys(arch)
    if config["model_type"] in _MOE_TYPES:  # no defaults for the experts either
        local = config["model_type"] in ("mixtral", "gpt_oss")
        experts = "num_local_experts" if local else "num_experts"
        required = required | {experts: "expert_count", "num_experts_per_tok": "expert_used_count"}
    if arch == "granite":
        required = required | {"logits_scaling": _GRANITE_KEYS["logits_scaling"]}
    optional = _OPTIONAL_KEYS | (_GRANITE_KEYS if arch == "granite" else {})
    names = {hf: f"{arch}.{key}" for hf, key in (required | optional).items()
             if hf in required or f"{arch}.{key}" in meta}  # fmt: skip
    if rope_freqs is not None:
        _add_rope_freqs(config, rope_freqs, path=path)
        names["rope_scaling"] = "rope_freqs.weight"
    if longrope is not None:
        _add_longrope(arch, config, meta, longrope)
        names["rope_scaling"] = "rope_factors_long/short.weight"
    check_config(config, source=path, names=names, required=required)
    if arch == "stablelm" and "blk.0.attn_q_norm.weight" in tensors:
        raise PocketLMError(
            f"{path} is a StableLM with per-head q/k norms (attn_q_norm), which pocketlm "
            "does not read from GGUF files; load its Hugging Face folder instead"
        )
    if arch not in ("gpt2", "gptneox", "falcon"):  # Llama's layout of heads
        _check_heads(arch, meta, config, path)
    if arch == "olmo2" and config["sliding_window"] is not None:
        # llama.cpp converts OLMo 3 as olmo2, windowing three layers in four.
        raise PocketLMError(
            f"{path} is an OLMo 3 conversion (olmo2 with a sliding window), "
            "which pocketlm does not support"
        )
    return config


def _is_int(v: Any) -> bool:
    return type(v) is int and v > 0


def quantization(meta: dict[str, Any], tensors: TensorTable) -> str:
    """The file type's name (Q4_K_M, Q8_0...), or the dominant matrix type without one."""
    return _quantization(meta, tensors)
