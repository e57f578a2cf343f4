"""Model cards: what a checkpoint on disk is, read from its config, without loading it.

`describe(path)` reads an HF folder's config.json (and only the headers of its
safetensors files) or a GGUF file's metadata (through `weights.gguf.read_gguf`), and
counts parameters from the config's shapes with the same arithmetic as the models
(GPT-2: nanoGPT's `get_num_params`; Llama family: HF `LlamaForCausalLM`). Knows nothing
of torch (a GGUF's sizes come from weights.gguf, imported when one is described);
nothing here reads tensor data.
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
NATIVE_ARCHITECTURES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3"})

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
    """Parameters implied by a config's shapes (tied embeddings counted once)."""
    s = shape_of(config)
    d, ff = s.width, s.intermediate
    if "n_embd" in config:  # GPT-2: learned positions, biases everywhere, LayerNorm w+b
        block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d)
        return s.vocab * d + s.context * d + s.layers * block + 2 * d
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    # Qwen2 has biases on q, k, v (no key for it); Llama's `attention_bias` covers q, k, v, o.
    qwen2_bias = s.architecture == "qwen2"
    llama_bias = bool(config.get("attention_bias", False)) and not qwen2_bias
    attention = d * q + 2 * d * kv + q * d
    attention += (q + 2 * kv) * (qwen2_bias or llama_bias) + d * llama_bias
    mlp = 3 * d * ff + (2 * ff + d) * bool(config.get("mlp_bias", False))
    block = attention + mlp + 2 * d  # two RMSNorm weights
    block += 2 * s.head_dim * (s.architecture == "qwen3")  # Qwen3's q_norm and k_norm
    head = 0 if s.tied else s.vocab * d
    return s.vocab * d + s.layers * block + d + head


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
