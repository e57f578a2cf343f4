"""Model cards: what a checkpoint on disk is, read from its config, without loading it.

`describe(path)` reads an HF folder's config.json (and only the headers of its
safetensors files) or a GGUF file's metadata (through `weights.gguf.read_gguf`), and
counts parameters on the native model built on the meta device (no memory, no data).
torch is imported only when a card is made; nothing here reads tensor data.
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
