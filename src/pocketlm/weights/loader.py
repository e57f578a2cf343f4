"""Checkpoint -> ready model: config, tensors, strict checks, tokenizer.

Two formats arrive at one path: a Hugging Face directory (config.json + safetensors,
sharded or not; `pytorch_model.bin` only through `torch.load(weights_only=True)`) and a
GGUF file (`weights.gguf` turns it into the same config dict and state dict). The model
is built on the `meta` device and each tensor is converted and assigned one at a time, so
loading never holds two copies of the weights. (nanoGPT `from_pretrained`, gpt-fast
`_load_model`, llama.cpp `tensor_mapping.py`.)
"""

import json
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from pocketlm.errors import CorruptModelError, PocketLMError
from pocketlm.models import ARCHITECTURES, LlamaConfig, build_config
from pocketlm.models.gpt2 import ACTIVATIONS
from pocketlm.tokenizer import Tokenizer
from pocketlm.weights import tables


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    config: dict[str, Any]  # the checkpoint's config.json (or its GGUF equivalent)
    path: Path
    native: bool  # False when running through transformers (an architecture we lack)


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


def load(
    path: Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> LoadedModel:
    """Load the checkpoint at `path` (an HF directory or a .gguf file)."""
    path = Path(path)
    if path.suffix == ".gguf":
        return _load_gguf(path, dtype=dtype, device=device)
    config = read_config(path)
    if config["model_type"] not in ARCHITECTURES:
        from pocketlm.weights.fallback import load_with_transformers

        return load_with_transformers(path, config, dtype=dtype, device=device)
    tensors = _hf_tensors(path, config["model_type"], dtype=dtype)
    model = build_model(config, tensors, dtype=dtype, device=device, source=path)
    return LoadedModel(model, _hf_tokenizer(path, config), config, path, native=True)


def _load_gguf(path: Path, *, dtype: torch.dtype, device: torch.device | str) -> LoadedModel:
    from pocketlm.weights.gguf import gguf_state_dict, read_gguf

    checkpoint = read_gguf(path)
    tensors = gguf_state_dict(checkpoint, dtype=dtype).items()
    model = build_model(checkpoint.config, tensors, dtype=dtype, device=device, source=path)
    tokenizer = Tokenizer.from_gguf_metadata(checkpoint.metadata)
    return LoadedModel(model, tokenizer, checkpoint.config, path, native=True)


def build_model(
    config: dict[str, Any],
    tensors: "Iterator[tuple[str, torch.Tensor]]",
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    source: Path,
) -> nn.Module:
    """Build the native model on `meta`, then assign each (name, tensor) after checking it.

    `tensors` yields our parameter names in nn.Linear orientation; each is converted to
    `dtype` on `device` as it arrives, so peak memory is the model plus one tensor."""
    _, model_cls = ARCHITECTURES[config["model_type"]]
    check_config(config, source=source)
    try:
        model_config = build_config(config)
    except (TypeError, ValueError) as error:
        raise CorruptModelError(
            f"{source}: config is not valid for {config['model_type']} ({error})"
        ) from None
    _check_heads(model_config, source=source)
    with torch.device("meta"):
        model = model_cls(model_config)
    expected = {name: p.shape for name, p in model.named_parameters()}  # tied weights appear once
    head, embedding = tables.TIED_KEYS[tables.family(config["model_type"])]
    seen = set()
    for name, tensor in tensors:
        if model_config.tie_word_embeddings and name == head:
            continue  # some tied checkpoints store the shared matrix twice
        if name not in expected:
            raise CorruptModelError(
                f"{source}: unexpected tensor {name!r}; is this a {config['model_type']} checkpoint?"
            )
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CorruptModelError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name])} from config.json"
            )
        _assign(model, name, tensor.to(device=device, dtype=dtype))
        seen.add(name)
    if missing := sorted(set(expected) - seen):
        raise CorruptModelError(
            f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)"
        )
    if model_config.tie_word_embeddings:
        _assign(model, head, model.get_parameter(embedding))
    model.init_buffers(device)
    return model.eval().requires_grad_(False)


# (smallest, largest) for each size a config may give. The upper bounds are far above any
# released model; they stop a corrupt value (2**40 layers, 2**64 columns) from building a
# model that hangs, overflows or allocates GBs before the shape checks can name the problem.
SIZE_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 2**24),
    **dict.fromkeys(("n_embd", "hidden_size", "n_inner", "intermediate_size"), (1, 2**20)),
    "head_dim": (2, 2**16),
    **dict.fromkeys(("n_layer", "num_hidden_layers"), (1, 1024)),
    **dict.fromkeys(("n_head", "num_attention_heads", "num_key_value_heads"), (1, 2**14)),
    # A context of one token leaves no room to generate anything after the prompt.
    **dict.fromkeys(("n_positions", "max_position_embeddings"), (2, 2**26)),
    "sliding_window": (1, 2**26),
}
FLOAT_LIMITS: dict[str, tuple[float, float]] = {  # (exclusive low, inclusive high)
    **dict.fromkeys(("layer_norm_epsilon", "rms_norm_eps"), (0.0, 1.0)),
    **dict.fromkeys(("rope_theta", "factor", "low_freq_factor", "high_freq_factor"), (0.0, 1e12)),
    "original_max_position_embeddings": (0.0, 2.0**26),
}
FLAGS = ("tie_word_embeddings", "attention_bias", "use_sliding_window")
# The numbers each rope_scaling type needs (pocketlm.models.llama.rope_inv_freq).
ROPE_KEYS = {"linear": ("factor",), "llama3": ("factor", "original_max_position_embeddings",
                                               "low_freq_factor", "high_freq_factor")}  # fmt: skip


def check_config(config: dict[str, Any], *, source: Path) -> None:
    """Every value the architecture's config reads has the right type and a sane range,
    so a corrupt config.json ends in one clear error naming the key, never in a crash,
    a hang or a huge allocation while the model is built."""
    config_cls, _ = ARCHITECTURES[config["model_type"]]
    for key in (f.name for f in fields(config_cls) if f.init):
        value = config.get(key)
        if value is None:
            continue  # the dataclass default
        if key in SIZE_LIMITS:
            low, high = SIZE_LIMITS[key]
            if not _is_int(value) or not low <= value <= high:
                _bad_config(source, key, value, f"an integer from {low} to {high}")
        elif key in FLOAT_LIMITS:
            _check_number(source, key, value)
        elif key in FLAGS and not isinstance(value, bool):
            _bad_config(source, key, value, "true or false")
        elif key == "activation_function" and (
            not isinstance(value, str) or value not in ACTIVATIONS
        ):
            _bad_config(source, key, value, f"one of {', '.join(ACTIVATIONS)}")
        elif key in ("rope_scaling", "rope_parameters"):
            _check_rope(source, key, value)


def _check_heads(model_config: Any, *, source: Path) -> None:
    """Relations between sizes that a forward pass relies on (GPT2Config checks its own)."""
    if not isinstance(model_config, LlamaConfig):
        return
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads
    if heads % kv_heads:
        expected = f"a divisor of num_attention_heads {heads}"
        _bad_config(source, "num_key_value_heads", kv_heads, expected)
    if model_config.head_dim < 2 or model_config.head_dim % 2:
        expected = "an even head size of at least 2 (rotary embeddings rotate pairs)"
        _bad_config(
            source,
            "head_dim (or hidden_size / num_attention_heads)",
            model_config.head_dim,
            expected,
        )


def _check_rope(source: Path, key: str, value: Any) -> None:
    if not isinstance(value, dict):
        _bad_config(source, key, value, "an object")
    kind = value.get("rope_type", value.get("type", "default"))
    if not isinstance(kind, str):
        _bad_config(source, f"{key}.rope_type", kind, "a string")
    for name in ROPE_KEYS.get(kind, ()):
        _check_number(source, f"{key}.{name}", value.get(name))
    if "rope_theta" in value:
        _check_number(source, f"{key}.rope_theta", value["rope_theta"])
    if kind == "llama3" and value["high_freq_factor"] <= value["low_freq_factor"]:
        _bad_config(
            source,
            f"{key}.high_freq_factor",
            value["high_freq_factor"],
            "more than low_freq_factor",
        )


def _check_number(source: Path, key: str, value: Any) -> None:
    low, high = FLOAT_LIMITS[key.rpartition(".")[2]]
    # Comparisons, not float(): exact for a 400-digit int, and false for NaN and infinity.
    if not isinstance(value, int | float) or isinstance(value, bool) or not low < value <= high:
        _bad_config(source, key, value, f"a number above {low:g} and at most {high:g}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad_config(source: Path, key: str, value: Any, expected: str) -> NoReturn:
    big = isinstance(value, int) and value.bit_length() > 64
    shown = f"a {value.bit_length()}-bit integer" if big else reprlib.repr(value)  # short
    raise CorruptModelError(
        f"{source}: config {key} = {shown} is not valid (expected {expected}); re-download the model"
    )


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if not isinstance(tensor, nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=False)
    setattr(module, attr, tensor)


def _hf_tensors(
    path: Path, model_type: str, *, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) pairs from safetensors shards (or a weights_only .bin)."""
    for key, tensor in _raw_hf_tensors(path):
        if tables.is_ignored(key, model_type):
            continue
        name = tables.rename(key, model_type)
        if tables.is_transposed(name, model_type):
            if tensor.dim() != 2:
                raise CorruptModelError(
                    f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, expected a matrix"
                )
            tensor = tensor.t()
        yield name, tensor


def _raw_hf_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors as memory-mapped views, the file mapped again for each tensor:
    a tensor later copied (to another dtype, quantized, or re-laid-out for decoding) then
    releases its pages when dropped, instead of keeping the whole file resident beside
    the copies (peak ~1x the weights, not source + copies)."""
    files = _safetensors_files(path)
    if not files:
        yield from _torch_bin_tensors(path)
        return
    for file in files:
        with _open_safetensors(file) as f:
            keys = list(f.keys())
        for key in keys:
            with _open_safetensors(file) as f:
                yield key, _get_tensor(f, key, file)


def _open_safetensors(file: Path):  # -> safetensors.safe_open
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptModelError(
            f"{file} is not a readable safetensors file ({error}); re-download it"
        ) from None
    except MemoryError:  # mmap refused: the file is larger than the address space allowed
        raise PocketLMError(
            f"cannot memory-map {file} ({file.stat().st_size:,} bytes): the process's "
            "address-space limit (ulimit -v) is too small for this model"
        ) from None


def _get_tensor(f, key: str, file: Path) -> torch.Tensor:  # noqa: ANN001 - safe_open handle
    from safetensors import SafetensorError

    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CorruptModelError(
            f"{file}: tensor {key!r} cannot be read ({error}); re-download it"
        ) from None


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, RecursionError, KeyError, TypeError) as error:
            raise CorruptModelError(f"{index} is not a valid shard index ({error})") from None
        if not isinstance(weight_map, dict):
            raise CorruptModelError(
                f"{index} is not a valid shard index (weight_map is not an object)"
            )
        if bad := [n for n in weight_map.values() if not _is_file_name(n)]:
            raise CorruptModelError(
                f"{index} names shard {reprlib.repr(bad[0])}, which is not a file name in {path}"
            )
        files = [path / name for name in sorted(set(weight_map.values()))]
        if missing := [f.name for f in files if not f.is_file()]:
            raise CorruptModelError(f"{path} is missing shard {missing[0]}; re-download the model")
        return files
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def _is_file_name(name: Any) -> bool:
    """A plain file name in the model folder: no path that reaches outside it."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
    )


def _torch_bin_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    file = path / "pytorch_model.bin"
    if not file.is_file():
        raise CorruptModelError(f"{path} has no model.safetensors (or pytorch_model.bin) weights")
    try:
        # weights_only: a .bin is a pickle, and we never unpickle arbitrary objects.
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for a bad or unsafe pickle
        raise CorruptModelError(
            f"{file} cannot be loaded safely ({error.__class__.__name__}); use safetensors"
        ) from None
    yield from state.items()


def _hf_tokenizer(path: Path, config: dict[str, Any]) -> Tokenizer:
    try:
        return Tokenizer.from_dir(path)
    except PocketLMError:
        if config["model_type"] == "gpt2" and config.get("vocab_size", 50257) == 50257:
            # A GPT-2 checkpoint without tokenizer files (as many training scripts save):
            # the shipped original vocabulary is the one it was trained with.
            return Tokenizer.gpt2()
        raise
