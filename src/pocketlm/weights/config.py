"""A checkpoint's config -> one validated config: config.json read, every value checked.

Hugging Face folders give config.json; GGUF files give metadata that `gguf_config.py`
maps onto the same keys. Both end here, in `check_config`: one set of bounds and one set
of messages, so a corrupt value from either format ends in one clear error naming the key
(never in a crash, a hang or a huge allocation while the model is built). Knows nothing
of tensors, file formats beyond config.json, or the network.
"""

import json
import reprlib
from collections.abc import Collection, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from pocketlm.errors import CorruptModelError
from pocketlm.models import ARCHITECTURES, LlamaConfig, build_config
from pocketlm.models.gemma import LAYER_TYPES
from pocketlm.models.layers import ACTIVATIONS

# The end of every config error: what the user can do about a bad file.
FIX = "re-download or re-convert the model"

# (smallest, largest) for each size a config may give. The upper bounds are far above any
# released model; they stop a corrupt value (2**40 layers, 2**64 columns) from building a
# model that hangs, overflows or allocates GBs before the shape checks can name the problem.
SIZE_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 2**24),
    **dict.fromkeys(
        ("n_embd", "hidden_size", "n_inner", "intermediate_size", "ffn_hidden_size"), (1, 2**20)
    ),
    "head_dim": (2, 2**16),
    **dict.fromkeys(("n_layer", "num_hidden_layers"), (1, 1024)),
    **dict.fromkeys(
        ("n_head", "num_attention_heads", "num_key_value_heads", "num_kv_heads"), (1, 2**14)
    ),
    "num_ln_in_parallel_attn": (1, 2),  # Falcon: one LayerNorm for both branches, or two
    # A context of one token leaves no room to generate anything after the prompt.
    **dict.fromkeys(("n_positions", "max_position_embeddings"), (2, 2**26)),
    "sliding_window": (1, 2**26),
    # Mixtures of experts (a Qwen config with no experts says num_experts 0: all dense).
    **dict.fromkeys(("num_local_experts", "num_experts"), (0, 2**12)),
    "num_experts_per_tok": (1, 2**12),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size"), (0, 2**20)),
    "decoder_sparse_step": (1, 1024),
    "sliding_window_pattern": (1, 1024),
    "no_rope_layer_interval": (1, 1024),
}
FLOAT_LIMITS: dict[str, tuple[float, float]] = {  # (exclusive low, inclusive high)
    **dict.fromkeys(
        ("layer_norm_epsilon", "rms_norm_eps", "layer_norm_eps", "norm_epsilon"), (0.0, 1.0)
    ),
    **dict.fromkeys(
        ("rope_theta", "rotary_emb_base", "factor", "low_freq_factor", "high_freq_factor"),
        (0.0, 1e12),
    ),
    **dict.fromkeys(("rope_local_base_freq", "query_pre_attn_scalar"), (0.0, 1e12)),
    # Gemma's soft caps: cap * tanh(x / cap); 0 would divide by zero.
    **dict.fromkeys(("attn_logit_softcapping", "final_logit_softcapping"), (0.0, 1e6)),
    # Each of freq_factors' and LongRoPE's short/long per-pair divisors.
    **dict.fromkeys(("factors", "short_factor", "long_factor"), (0.0, 1e12)),
    "original_max_position_embeddings": (0.0, 2.0**26),
    # YaRN's and LongRoPE's optional numbers (HF `_compute_yarn_parameters`).
    **dict.fromkeys(
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"), (0.0, 1e12)
    ),
    **dict.fromkeys(("partial_rotary_factor", "rotary_pct"), (0.0, 1.0)),
    # Granite's scales (released ones: 12, 0.0078125, 0.22, 8); the logits are divided by
    # logits_scaling, so none may be 0.
    **dict.fromkeys(
        ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling"),
        (0.0, 1e6),
    ),
    # GPT-OSS's clamped SwiGLU: sigmoid(alpha * gate), both clamped at limit.
    **dict.fromkeys(("swiglu_alpha", "swiglu_limit"), (0.0, 1e6)),
}
FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window",
         "use_bidirectional_attention", "norm_topk_prob", "qkv_bias",
         "use_qkv_bias", "qk_layernorm", "use_parallel_residual", "use_bias",  # StableLM...
         "new_decoder_architecture", "multi_query", "parallel_attn", "alibi", "bias")  # fmt: skip
# Keys naming an activation function (GPT-2; Falcon); Llama's hidden_act the dataclass checks.
ACTIVATION_KEYS = ("activation_function", "activation")
# The numbers each rope_scaling type needs (pocketlm.models.rope.rope_inv_freq); YaRN's and
# LongRoPE's pretraining context and factor may be left out (HF derives them).
ROPE_KEYS = {"linear": ("factor",), "llama3": ("factor", "original_max_position_embeddings",
                                               "low_freq_factor", "high_freq_factor")}  # fmt: skip
# The numbers a rope_scaling may give, checked where present.
ROPE_OPTIONAL_KEYS = ("factor", "original_max_position_embeddings", "attention_factor",
                      "beta_fast", "beta_slow", "mscale", "mscale_all_dim")  # fmt: skip
# Lists of per-pair divisors, by rope_scaling type.
ROPE_FACTOR_LISTS = {"freq_factors": ("factors",), "longrope": ("short_factor", "long_factor")}


def read_config(path: Path) -> dict[str, Any]:
    """config.json of an HF directory as a dict, with a clear error when it is not one."""
    file = path / "config.json"
    if not file.is_file():
        raise CorruptModelError(f"{path} has no config.json: is it a Hugging Face model folder?")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # bad UTF-8 or JSON, huge ints, deep nesting
        raise CorruptModelError(
            f"{file} is not valid JSON ({error}); re-download the model"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise CorruptModelError(f"{file} has no model_type; re-download the model")
    return config


class _Checker:
    """Where a config came from and how it names its keys, for the messages."""

    def __init__(self, source: Path, names: Mapping[str, str]) -> None:
        self.source, self.names = source, names

    def bad(self, key: str, value: Any, expected: str) -> NoReturn:
        big = isinstance(value, int) and value.bit_length() > 64
        shown = f"a {value.bit_length()}-bit integer" if big else reprlib.repr(value)  # short
        raise CorruptModelError(
            f"{self.source}: config {self._name(key)} = {shown} is not valid "
            f"(expected {expected}); {FIX}"
        )

    def missing(self, key: str) -> NoReturn:
        raise CorruptModelError(
            f"{self.source}: config {self._name(key)} is missing (expected {_expected(key)}); {FIX}"
        )

    def _name(self, key: str) -> str:
        head, dot, rest = key.partition(".")  # "rope_scaling.factor": name the outer key
        return self.names.get(head, head) + dot + rest


def check_config(
    config: dict[str, Any],
    *,
    source: Path,
    names: Mapping[str, str] | None = None,
    required: Collection[str] = (),
) -> Any:
    """Check every value the architecture's config reads (type, range, the relations a
    forward pass relies on) and return that config dataclass built from `config`.

    An absent (None) value takes the dataclass default, except the keys in `required`
    (a GGUF has no defaults for its shape). `names`: how the file itself calls a key (a
    GGUF metadata key), used in the messages in place of the config.json name."""
    check = _Checker(source, names or {})
    config_cls, _ = ARCHITECTURES[config["model_type"]]
    if config.get("use_sliding_window") is False:
        # A window switched off is never read (Qwen2-MoE then writes sliding_window 0).
        config = {k: v for k, v in config.items() if k != "sliding_window"}
    for key in (f.name for f in fields(config_cls) if f.init):
        value = config.get(key)
        if value is None:
            if key in required:
                check.missing(key)
            continue  # the dataclass default
        _check_value(check, key, value, config_type=config["model_type"])
    if config["model_type"] == "gpt2":
        _check_gpt2_heads(check, config, config_cls)
    try:
        model_config = build_config(config)
    except (TypeError, ValueError) as error:
        raise CorruptModelError(
            f"{source}: config is not valid for {config['model_type']} ({error}); {FIX}"
        ) from None
    if isinstance(model_config, LlamaConfig):
        _check_llama_heads(check, model_config)
        _check_rope_factors(check, model_config)
        _check_experts(check, model_config)
    return model_config


def _check_value(check: _Checker, key: str, value: Any, *, config_type: str) -> None:
    if key in FLOAT_LIMITS:
        _check_number(check, key, value)
    elif key in ("rope_scaling", "rope_parameters"):
        _check_rope(check, key, value, config_type=config_type)
    elif key == "no_rope_layers":
        if not isinstance(value, list) or any(v not in (0, 1) for v in value):
            check.bad(key, value, _expected(key))
    elif not _is_valid(key, value):
        check.bad(key, value, _expected(key))


def _is_valid(key: str, value: Any) -> bool:
    if key in SIZE_LIMITS:
        low, high = SIZE_LIMITS[key]
        return _is_int(value) and low <= value <= high
    if key in FLAGS:
        return isinstance(value, bool)
    if key in ACTIVATION_KEYS:
        return isinstance(value, str) and value in ACTIVATIONS
    return True  # a value no check covers (model_type, hidden_act: the dataclass checks)


def _expected(key: str) -> str:
    """What a valid value of `key` looks like, in words."""
    name = key.rpartition(".")[2]
    if name in SIZE_LIMITS:
        low, high = SIZE_LIMITS[name]
        return f"an integer from {low} to {high}"
    if name in FLOAT_LIMITS:
        low, high = FLOAT_LIMITS[name]
        return f"a number above {low:g} and at most {high:g}"
    if name in FLAGS:
        return "true or false"
    if name in ACTIVATION_KEYS:
        return f"one of {', '.join(ACTIVATIONS)}"
    if name == "no_rope_layers":
        return "a list of 0 and 1, one per layer"
    return "an object" if name in ("rope_scaling", "rope_parameters") else "a value"


def _check_gpt2_heads(check: _Checker, config: dict[str, Any], config_cls: type) -> None:
    """GPT-2 splits n_embd evenly between its heads (GPT2Config would raise otherwise)."""
    defaults = {f.name: f.default for f in fields(config_cls) if f.init}
    n_embd, n_head = (config.get(k) or defaults[k] for k in ("n_embd", "n_head"))
    if n_embd % n_head:
        check.bad("n_head", n_head, f"a divisor of n_embd {n_embd}")


def _check_llama_heads(check: _Checker, model_config: LlamaConfig) -> None:
    """Relations between sizes that a forward pass relies on, after defaults are derived."""
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads
    if heads % kv_heads:
        check.bad("num_key_value_heads", kv_heads, f"a divisor of num_attention_heads {heads}")
    no_rope = model_config.no_rope_layers  # SmolLM3's, spelled out by LlamaConfig
    if no_rope is not None and len(no_rope) != model_config.num_layers:
        check.bad("no_rope_layers", no_rope, f"{model_config.num_layers} numbers, one per layer")
    if model_config.head_dim < 2 or model_config.head_dim % 2:
        check.bad(
            "head_dim (or hidden_size / num_attention_heads)",
            model_config.head_dim,
            "an even head size of at least 2 (rotary embeddings rotate pairs)",
        )
    if model_config.rotary_dim < 2 or model_config.rotary_dim % 2:
        expected = f"a share of the head size {model_config.head_dim} that is an even number"
        check.bad("partial_rotary_factor", model_config.partial_rotary_factor, expected)


def _check_experts(check: _Checker, model_config: LlamaConfig) -> None:
    """A token's experts are chosen among those there are; dense layers are layers."""
    if model_config.n_experts and model_config.num_experts_per_tok > model_config.n_experts:
        expected = f"at most the {model_config.n_experts} experts there are"
        check.bad("num_experts_per_tok", model_config.num_experts_per_tok, expected)
    layers = model_config.mlp_only_layers
    if not isinstance(layers, list) or not all(
        _is_int(i) and 0 <= i < model_config.num_hidden_layers for i in layers
    ):
        check.bad("mlp_only_layers", layers, "a list of layer indices")


def _check_rope_factors(check: _Checker, model_config: LlamaConfig) -> None:
    """freq_factors and LongRoPE's factors divide the rotary frequencies pair by pair: one
    factor per pair."""
    scaling, pairs = model_config.rope_scaling or {}, model_config.rotary_dim // 2
    kind = scaling.get("rope_type", scaling.get("type"))
    for name in ROPE_FACTOR_LISTS.get(kind, ()):
        if len(factors := scaling[name]) != pairs:
            expected = f"{pairs} numbers, one per pair of the {pairs * 2} rotated head dimensions"
            check.bad(f"rope_scaling.{name}", factors, expected)


def _check_rope(check: _Checker, key: str, value: Any, *, config_type: str) -> None:
    if not isinstance(value, dict):
        check.bad(key, value, "an object")
    if per_layer_type := [t for t in LAYER_TYPES if t in value]:  # Gemma 3: one per kind
        for kind in per_layer_type:
            if value[kind] is not None:  # null: that kind's defaults
                _check_rope(check, f"{key}.{kind}", value[kind], config_type=config_type)
        return
    kind = value.get("rope_type", value.get("type", "default"))
    if not isinstance(kind, str):
        check.bad(f"{key}.rope_type", kind, "a string")
    if kind in ("su", "yarn") and config_type == "phi3":
        kind = "longrope"  # Phi-3's older names for it (HF Phi3Config)
    for name in ROPE_FACTOR_LISTS.get(kind, ()):
        factors = value.get(name)
        if not isinstance(factors, list | tuple) or not factors:
            check.bad(f"{key}.{name}", factors, "a list of numbers")
        for factor in factors:
            _check_number(check, f"{key}.{name}", factor)
    for name in ROPE_KEYS.get(kind, ()):
        _check_number(check, f"{key}.{name}", value.get(name))
    for name in ROPE_OPTIONAL_KEYS:
        if value.get(name) is not None:
            _check_number(check, f"{key}.{name}", value[name])
    if value.get("truncate") is not None and not isinstance(value["truncate"], bool):
        check.bad(f"{key}.truncate", value["truncate"], "true or false")
    if "rope_theta" in value:
        _check_number(check, f"{key}.rope_theta", value["rope_theta"])
    if kind == "llama3" and value["high_freq_factor"] <= value["low_freq_factor"]:
        check.bad(f"{key}.high_freq_factor", value["high_freq_factor"], "more than low_freq_factor")


def _check_number(check: _Checker, key: str, value: Any) -> None:
    low, high = FLOAT_LIMITS[key.rpartition(".")[2]]
    # Comparisons, not float(): exact for a 400-digit int, and false for NaN and infinity.
    if not isinstance(value, int | float) or isinstance(value, bool) or not low < value <= high:
        check.bad(key, value, _expected(key))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
