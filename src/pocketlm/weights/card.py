"""Model cards: what a checkpoint on disk is, read from its config, without loading it.

`describe(path)` reads an HF folder's config.json (and only the headers of its
safetensors files) or a GGUF file's metadata (through `weights.gguf.read_gguf`), and
counts parameters on the native model built on the meta device (no memory, no data;
torch is imported only when a card is made); nothing here reads tensor data. `family`
and `features` name what a config switches on (grouped-query attention, sliding windows,
RoPE scaling, experts...) from its keys alone, so they work for families whose modules
do not exist yet.
"""

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketlm import paths
from pocketlm.errors import CorruptModelError

# Architectures with a module under pocketlm/models; others run through transformers.
# (models.ARCHITECTURES' keys, written out so that a card needs no torch to say which;
# tests/test_families.py checks the two agree.)
NATIVE_ARCHITECTURES = frozenset(
    {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
     "mixtral", "qwen2_moe", "qwen3_moe", "phi3", "smollm3", "olmo2", "granite",
     "stablelm", "starcoder2", "gpt_neox", "falcon", "gpt_oss"}
)  # fmt: skip

RAM_NOTE = (
    "weights only, at the dtype you load with; add the KV cache "
    "(grows with the context) and about 10% for activations"
)

_SAFETENSORS_DTYPES = {"F32": "f32", "BF16": "bf16", "F16": "f16", "F64": "f64", "I8": "int8"}


@dataclass(frozen=True)
class Shape:
    """The shape-defining numbers of a config, whatever the checkpoint calls them."""

    architecture: str
    width: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    context: int
    tied: bool


@dataclass(frozen=True)
class ModelCard:
    """A checkpoint's vital statistics, for `pocketlm show` and `pocketlm list`."""

    name: str
    path: Path
    architecture: str
    parameters: int
    layers: int
    heads: int
    kv_heads: int
    width: int
    context: int
    vocab: int
    quantization: str  # GGUF tensor type ("Q4_1") or safetensors dtype ("bf16")
    file_size: int  # bytes of the weight files
    native: bool  # False: runs through transformers, slower
    ram_fp32: int
    ram_bf16: int
    ram_int8: int
    ram_int4: int  # 4-bit codes + a bf16 scale and offset per 32 weights
    kv_cache_per_token_bf16: int  # bytes the cache grows by per token of context
    ram_default: int = 0  # the weights as a plain load holds them (GGUF: as stored)
    type_mix: tuple[tuple[str, int], ...] = ()  # GGUF: (tensor type, bytes), largest first
    ram_note: str = RAM_NOTE
    family: str = ""  # readable family name, e.g. "Gemma 2"
    features: tuple[str, ...] = ()  # e.g. "grouped-query attention (8 kv heads)"


def describe(path: Path, *, name: str | None = None) -> ModelCard:
    """The card of an HF-layout folder or a `.gguf` file."""
    path = Path(path)
    mix: tuple[tuple[str, int], ...] = ()
    if path.suffix == ".gguf":
        config, quantization, size, mix, stored = _gguf_facts(path)
    else:
        config, quantization, size = _folder_facts(path)
    shape = shape_of(config)
    params = count_parameters(config)
    if not mix:
        stored = params * 4  # a folder loads in fp32 unless told otherwise
    return ModelCard(
        name=name or model_name(path),
        path=path,
        architecture=shape.architecture,
        parameters=params,
        layers=shape.layers,
        heads=shape.heads,
        kv_heads=shape.kv_heads,
        width=shape.width,
        context=shape.context,
        vocab=shape.vocab,
        quantization=quantization,
        file_size=size,
        native=shape.architecture in NATIVE_ARCHITECTURES,
        ram_fp32=params * 4,
        ram_bf16=params * 2,
        ram_int8=params,
        ram_int4=params * 5 // 8,  # 0.5 byte + 4 bytes per 32
        kv_cache_per_token_bf16=2 * shape.layers * shape.kv_heads * shape.head_dim * 2,
        ram_default=stored,
        type_mix=mix,
        family=family(config),
        features=tuple(features(config)),
    )


def shape_of(config: dict[str, Any]) -> Shape:
    """Normalise GPT-2 keys (n_embd, n_layer...) and Llama-family keys (hidden_size...)."""
    try:
        if "n_embd" in config:
            width, heads = int(config["n_embd"]), int(config["n_head"])
            return Shape(
                architecture=str(config.get("model_type", "gpt2")),
                width=width,
                layers=int(config["n_layer"]),
                heads=heads,
                kv_heads=heads,
                head_dim=width // heads,
                intermediate=int(config.get("n_inner") or 4 * width),
                vocab=int(config["vocab_size"]),
                context=int(config.get("n_positions") or config.get("n_ctx") or 0),
                tied=True,
            )
        width, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        return Shape(
            architecture=str(config.get("model_type", "unknown")),
            width=width,
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or width // heads),
            intermediate=int(config.get("intermediate_size") or 4 * width),
            vocab=int(config["vocab_size"]),
            context=int(config.get("max_position_embeddings") or 0),
            tied=bool(config.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptModelError(f"the model config lacks or garbles {error}") from error


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of the model a config describes (tied embeddings counted once).

    A native architecture is counted on the model itself, built on PyTorch's meta device
    (shapes, no memory), so the count is exact for every family and switch; other
    architectures (run through transformers) get a Llama-shaped estimate."""
    if config.get("model_type") in NATIVE_ARCHITECTURES:
        return _count_native(config)
    s = shape_of(config)
    d, ff = s.width, s.intermediate
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    attention = d * q + 2 * d * kv + q * d
    block = attention + 3 * d * ff + 2 * d  # q/k/v/o, gate/up/down, two norms
    head = 0 if s.tied else s.vocab * d
    return s.vocab * d + s.layers * block + d + head


def _count_native(config: dict[str, Any]) -> int:
    import torch  # here, not above: `pocketlm show` of a GGUF needs no torch otherwise

    from pocketlm.models import ARCHITECTURES, build_config

    try:
        model_config = build_config(config)
    except (TypeError, ValueError, KeyError) as error:
        raise CorruptModelError(f"the model config is not valid ({error})") from None
    with torch.device("meta"):
        model = ARCHITECTURES[config["model_type"]][1](model_config)
    return sum(p.numel() for p in model.parameters())  # a tied weight is listed once


def model_name(path: Path) -> str:
    """A readable name for a checkpoint path: hub repo id, store name or file/folder name."""
    path = Path(path)
    folder = path.parent if path.suffix == ".gguf" else path
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.removeprefix("models--").replace("--", "/")
    if folder.parent.resolve() == paths.model_store().resolve():
        return folder.name
    return path.stem if path.suffix == ".gguf" else path.name


def read_hf_config(folder: Path) -> dict[str, Any]:
    file = Path(folder) / "config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError as error:
        raise CorruptModelError(f"{folder} has no config.json") from error
    except (OSError, ValueError) as error:
        raise CorruptModelError(f"{file} is not readable JSON: {error}") from error
    if not isinstance(config, dict):
        raise CorruptModelError(f"{file} is not a JSON object")
    return config


def safetensors_dtype(files: list[Path]) -> str:
    """The dtype holding most elements across safetensors files, read from headers only."""
    elements: Counter[str] = Counter()
    for file in files:
        for key, info in _safetensors_header(file).items():
            if key != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                elements[info["dtype"]] += count
    if not elements:
        return "unknown"
    dtype = elements.most_common(1)[0][0]
    return _SAFETENSORS_DTYPES.get(dtype, dtype.lower())


def _safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file: 8-byte little-endian length, then JSON."""
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            return json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as error:
        raise CorruptModelError(f"{file} is not a readable safetensors file: {error}") from error


def _folder_facts(folder: Path) -> tuple[dict[str, Any], str, int]:
    config = read_hf_config(folder)
    weights = sorted(folder.glob("*.safetensors"))
    size = sum(file.stat().st_size for file in weights)
    return config, safetensors_dtype(weights), size


def _gguf_facts(file: Path) -> tuple[dict[str, Any], str, int, tuple, int]:
    """Config, file type, size, tensor type mix and the bytes a default load holds."""
    # heavy (numpy, torch): only for GGUF files
    from pocketlm.weights.gguf import read_gguf, stored_bytes, type_mix

    checkpoint = read_gguf(file)
    return (
        dict(checkpoint.config),
        str(checkpoint.quantization),
        file.stat().st_size,
        tuple(type_mix(checkpoint)),
        stored_bytes(checkpoint),
    )


def human_count(n: int) -> str:
    """124439808 -> '124M', 1557611200 -> '1.6B'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    """98362432 -> '98.4 MB' (decimal units, as download sizes are quoted)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# -- the family and the features a config switches on ------------------------------------
# Read from config.json keys (or the config weights/gguf_config.py derives from a GGUF), so
# `pocketlm show` names them for any family, native or not, whether its module exists yet.

FAMILIES = {
    "gpt2": "GPT-2",
    "llama": "Llama",
    "mistral": "Mistral",
    "mixtral": "Mixtral (Mistral MoE)",
    "qwen2": "Qwen2",
    "qwen2_moe": "Qwen2-MoE",
    "qwen3": "Qwen3",
    "qwen3_moe": "Qwen3-MoE",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gemma3": "Gemma 3",
    "gemma3_text": "Gemma 3",
    "phi": "Phi",
    "phi3": "Phi-3",
    "olmo2": "OLMo 2",
    "smollm3": "SmolLM3",
    "granite": "Granite",
    "granitemoe": "Granite-MoE",
    "gpt_neox": "GPT-NeoX",
    "falcon": "Falcon",
    "stablelm": "StableLM",
    "starcoder2": "StarCoder2",
    "gpt_oss": "GPT-OSS",
}

# What a family always has, which its config.json has no key for.
_QK_NORM = frozenset({"qwen3", "qwen3_moe", "olmo2", "gemma3", "gemma3_text"})
_SANDWICH_NORMS = frozenset({"gemma2", "gemma3", "gemma3_text"})  # before and after each sublayer
_POST_NORMS = frozenset({"olmo2"})  # after attention and MLP, not before
_SCALED_EMBEDDINGS = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})  # x sqrt(width)
_QKV_BIAS = frozenset({"qwen2", "qwen2_moe"})  # q, k, v biases, no key for them
_ALTERNATING_WINDOW = frozenset({"gemma2"})  # sliding on even layers when no layer_types
_SINKS = frozenset({"gpt_oss"})  # a learned per-head logit that soaks up attention
_TIED_BY_DEFAULT = frozenset(
    {"gpt2", "gemma", "gemma2", "gemma3", "gemma3_text", "smollm3", "falcon", "starcoder2"}
)


def family(config: dict[str, Any]) -> str:
    """The family's readable name ("Gemma 2"), or the config's model_type as is."""
    model_type = str(config.get("model_type", "unknown"))
    return FAMILIES.get(model_type, model_type)


def features(config: dict[str, Any]) -> list[str]:
    """The architectural features a config uses, in words, e.g. "grouped-query attention
    (8 kv heads)", "sliding window 4096 on alternating layers", "8 experts, top-2"."""
    kind = str(config.get("model_type", ""))
    s = shape_of(config)
    found = [_attention_kind(config, s), *_window(config, kind, s.layers), *_positions(config)]
    if s.head_dim * s.heads != s.width:
        found.append(f"head dim {s.head_dim}")
    found += [name for name, on in _switches(config, kind, s) if on]
    attention_cap, final_cap = (
        config.get("attn_logit_softcapping"),
        config.get("final_logit_softcapping"),
    )
    if attention_cap or final_cap:
        found.append(f"soft-capping {_num(attention_cap or 0)}/{_num(final_cap or 0)}")
    found += _experts(config)
    found += _granite_scales(config)
    return found


def _attention_kind(config: dict[str, Any], s: Shape) -> str:
    kv = s.kv_heads
    if config.get("model_type") == "falcon" and not config.get("new_decoder_architecture"):
        kv = 1 if config.get("multi_query", True) else s.heads  # old Falcon: a flag, not a count
    elif config.get("model_type") == "falcon":
        kv = int(config.get("num_kv_heads") or s.heads)
    if kv == 1:
        return "multi-query attention (1 kv head)"
    if kv < s.heads:
        return f"grouped-query attention ({kv} kv heads)"
    return f"multi-head attention ({s.heads} heads)"


def _window(config: dict[str, Any], kind: str, layers: int) -> list[str]:
    window = config.get("sliding_window")
    if not window or config.get("use_sliding_window") is False:
        return []
    types = config.get("layer_types")
    if isinstance(types, list) and types:
        sliding = [t == "sliding_attention" for t in types]
    elif kind in _ALTERNATING_WINDOW:
        sliding = [i % 2 == 0 for i in range(layers)]
    elif pattern := config.get("sliding_window_pattern"):  # Gemma 3: every n-th is global
        sliding = [(i + 1) % int(pattern) != 0 for i in range(layers)]
    else:
        sliding = [True] * layers
    if not any(sliding):
        return []
    return [f"sliding window {window} on {_which_layers(sliding)}"]


def _which_layers(flags: list[bool]) -> str:
    """'every layer', 'alternating layers', '5 of every 6 layers' or '3 of 10 layers'."""
    if all(flags):
        return "every layer"
    for period in range(2, min(len(flags), 9)):  # the shortest repeating pattern, if any
        if all(f == flags[i % period] for i, f in enumerate(flags)):
            if period == 2 and flags[0] != flags[1]:
                return "alternating layers"
            return f"{sum(flags[:period])} of every {period} layers"
    return f"{sum(flags)} of {len(flags)} layers"


def _positions(config: dict[str, Any]) -> list[str]:
    if "n_embd" in config:
        return ["learned absolute positions"]
    if config.get("alibi"):
        return ["ALiBi positions"]
    rope = config.get("rope_parameters") or {}
    local_theta = config.get("rope_local_base_freq")  # Gemma 3's config.json
    if isinstance(rope, dict) and "full_attention" in rope:  # per layer type (transformers 5)
        local_theta = (rope.get("sliding_attention") or {}).get("rope_theta")
        rope = rope["full_attention"]
    scaling = config.get("rope_scaling") or rope
    kind = scaling.get("rope_type") or scaling.get("type") if isinstance(scaling, dict) else None
    text = "RoPE"
    if theta := config.get("rope_theta") or rope.get("rope_theta"):
        local = f", {_num(local_theta)} on sliding layers" if local_theta else ""
        text += f" (theta {_num(theta)}{local})"
    if kind and kind != "default":
        factor = scaling.get("factor")
        text += f", {kind} scaling" + (f" x{_num(factor)}" if factor else "")
    found = [text]
    partial = config.get("partial_rotary_factor") or rope.get("partial_rotary_factor")
    partial = partial or config.get("rotary_pct")
    if partial and float(partial) < 1:
        found.append(f"partial RoPE ({_num(100 * float(partial))}% of each head)")
    if (interval := config.get("no_rope_layer_interval")) and config.get("no_rope_layers"):
        found.append(f"no RoPE on every {interval}th layer")
    return found


def _switches(config: dict[str, Any], kind: str, s: Shape) -> list[tuple[str, bool]]:
    parallel = config.get("parallel_attn") or config.get("use_parallel_residual")
    # A config.json that leaves the key out gets its transformers class's default.
    tied = config.get("tie_word_embeddings", kind in _TIED_BY_DEFAULT)
    layer_norm = any(k in config for k in ("layer_norm_epsilon", "layer_norm_eps", "norm_epsilon"))
    return [
        ("LayerNorm", layer_norm and "rms_norm_eps" not in config),
        ("q/k norm", kind in _QK_NORM),
        ("norms before and after each sublayer", kind in _SANDWICH_NORMS),
        ("norms after attention and MLP", kind in _POST_NORMS),
        ("embeddings scaled by sqrt(width)", kind in _SCALED_EMBEDDINGS),
        ("q/k/v biases", kind in _QKV_BIAS),
        ("attention biases", bool(config.get("attention_bias")) and kind not in _QKV_BIAS),
        ("MLP biases", bool(config.get("mlp_bias"))),
        ("biases on every linear layer", bool(config.get("use_bias"))),
        ("attention sinks", kind in _SINKS),
        ("parallel attention and MLP", bool(parallel)),
        ("tied embeddings", bool(tied)),
    ]


def _experts(config: dict[str, Any]) -> list[str]:
    experts = config.get("num_local_experts") or config.get("num_experts")
    if not experts:
        return []
    top = config.get("num_experts_per_tok") or config.get("experts_per_token")
    text = f"{experts} experts" + (f", top-{top}" if top else "")
    if config.get("shared_expert_intermediate_size"):
        text += ", plus a shared expert"
    return [text]


def _granite_scales(config: dict[str, Any]) -> list[str]:
    names = ("embedding_multiplier", "attention_multiplier", "residual_multiplier")
    scales = [f"{n.split('_')[0]} x{_num(config[n])}" for n in names if config.get(n)]
    if config.get("logits_scaling"):
        scales.append(f"logits /{_num(config['logits_scaling'])}")
    return [f"multipliers ({', '.join(scales)})"] if scales else []


def _num(value: Any) -> str:
    """50.0 -> '50', 0.22 -> '0.22', 1000000.0 -> '1000000'."""
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"
