"""Checkpoint -> model ready for inference: config, tensors, strict checks, an adapter
merged in, tokenizer, then `kernels.prepare`.

Two formats arrive at one path: a Hugging Face directory (config.json + safetensors,
sharded or not; `pytorch_model.bin` only through `torch.load(weights_only=True)`) and a
GGUF file (`weights.gguf` turns it into the same config dict and tensor stream). The model
is built on the `meta` device and each tensor is converted and assigned one at a time, so
loading never holds two copies of the weights. A GGUF loaded for inference with no dtype
asked keeps its matrices (and its embedding) as stored: each becomes a `GGUFLinear` on the
file's own blocks (kernels.gguf), never expanded to float. With a quantization, a GGUF's
matrices whose stored blocks a quantized layer can take as they are (Q8_0 -> int8,
Q4_0/Q4_1 -> int4) go straight there. Before any tensor is read, the memory the load will
hold is checked against what is free (weights.memory). Architectures without a native module run
through `weights.fallback`. (nanoGPT `from_pretrained`, gpt-fast `_load_model`, llama.cpp
`tensor_mapping.py`.) Knows nothing of generation, sampling or where a path came from.
"""

import json
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from pocketlm.errors import CorruptModelError, PocketLMError
from pocketlm.kernels.gguf import STORED_TYPES, GGUFEmbedding, GGUFLinear, gguf_matrix
from pocketlm.kernels.int4 import Q4_BLOCK_BYTES, Int4Linear, q4_to_int4, quantize_int4
from pocketlm.kernels.int8 import Int8Linear, q8_0_to_int8, quantize_int8
from pocketlm.kernels.prepare import check_quantization
from pocketlm.kernels.prepare import prepare as prepare_model
from pocketlm.models import ARCHITECTURES
from pocketlm.tokenizer import Tokenizer
from pocketlm.weights import dequant, tables
from pocketlm.weights.adapter import Adapter, fit_adapter, merge_adapter, read_adapter
from pocketlm.weights.config import check_config, read_config
from pocketlm.weights.fallback import transformers_model
from pocketlm.weights.gguf import (
    GGUFCheckpoint,
    gguf_raw_tensors,
    gguf_tensors,
    read_gguf,
    stored_bytes,
)
from pocketlm.weights.memory import check_fits, release_freed_memory

STORED = "stored"  # the `quantize` of a GGUF kept in its own quantization (the default)

# Our name -> (ggml type, undecoded blocks, shape) of a GGUF matrix loaded as it is stored.
Direct = dict[str, tuple[str, np.ndarray, tuple[int, ...]]]


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    config: dict[str, Any]  # the checkpoint's config.json (or its GGUF equivalent)
    path: Path
    native: bool  # False when running through transformers (an architecture we lack)


def load(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    quantize: str | None = None,
    adapter: str | Path | None = None,
    prepare: bool = False,
) -> LoadedModel:
    """Load the checkpoint at `path` (an HF directory or a .gguf file).

    `dtype` None: the checkpoint's own where pocketlm can run it so: a GGUF prepared for
    a CPU keeps its quantized and half-precision matrices as stored; otherwise float32.
    `adapter`: a LoRA adapter folder (`pocketlm finetune --lora --adapter-only`), merged
    into the float weights. `prepare=True`: ready for inference (`kernels.prepare`: fused,
    quantized as `quantize` says, re-laid out for the device); without it the model keeps
    the checkpoint's own layers and names (for training, export, or as a reference)."""
    path = Path(path)
    if quantize is not None and not prepare:
        raise ValueError("quantize needs prepare=True: quantized layers are made for inference")
    check_quantization(quantize, device=device)
    lora = None if adapter is None else read_adapter(adapter)
    if path.suffix == ".gguf":
        if dtype is None and quantize is None and prepare and torch.device(device).type == "cpu":
            quantize = STORED
        loaded = _load_gguf(
            read_gguf(path), dtype=dtype, device=device, quantize=quantize, adapter=lora
        )
        quantize = None if quantize == STORED else quantize
    else:
        loaded = _load_hf(path, dtype=dtype, device=device, adapter=lora)
    if prepare:
        prepare_model(loaded.model, quantize=quantize)
    release_freed_memory()
    return loaded


def _load_hf(
    path: Path, *, dtype: torch.dtype | None, device: torch.device | str, adapter: Adapter | None
) -> LoadedModel:
    config = read_config(path)
    kind = config["model_type"]
    dtype = dtype or torch.float32
    if kind in ARCHITECTURES:
        model = empty_model(config, source=path)
        _check_memory(model, path, device=device, dtype=dtype, quantize=None, stored=None)
        tensors = _hf_tensors(path, kind)
        assign_tensors(model, tensors, model_type=kind, dtype=dtype, device=device, source=path)
        tokenizer, native = _hf_tokenizer(path, config), True
    else:
        model = transformers_model(path, config, dtype=dtype, device=device)
        tokenizer, native = Tokenizer.from_dir(path), False
    if adapter is not None:
        merge_adapter(model, fit_adapter(adapter, model), scale=adapter.config.scale)
    return LoadedModel(model, tokenizer, config, path, native=native)


def _check_memory(
    model: nn.Module,
    path: Path,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    quantize: str | None,
    stored: int | None,
) -> None:
    """Refuse before reading any tensor a load onto the CPU that cannot fit in the memory
    available, naming the lighter ways to load this model that would (weights.memory).
    `model`: the model on the `meta` device, whose parameters are counted."""
    if torch.device(device).type != "cpu":
        return
    params = sum(p.numel() for p in model.parameters())  # a tied matrix counts once
    ways = {"without --dtype": stored} if stored is not None else {}
    ways |= {
        "--dtype bf16": 2 * params,
        "--quantize int8": params * 17 // 16,  # + a scale per 32
        "--quantize int4": params * 5 // 8,  # + a scale and an offset per 32
    }
    if quantize == STORED:
        what, need = f"{path.name} as stored", stored
    elif quantize is not None:
        what, need = f"{path.name} in {quantize}", ways[f"--quantize {quantize}"]
    else:
        what = f"{path.name} in {str(dtype).removeprefix('torch.')}"
        need = params * dtype.itemsize
    lighter = {how: size for how, size in ways.items() if size is not None and size < need}
    check_fits(what, need, lighter=lighter)


def _load_gguf(
    checkpoint: GGUFCheckpoint,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str,
    quantize: str | None,
    adapter: Adapter | None,
) -> LoadedModel:
    path, dtype = checkpoint.path, dtype or torch.float32
    model = empty_model(checkpoint.config, source=path)
    stored = stored_bytes(checkpoint)
    _check_memory(model, path, device=device, dtype=dtype, quantize=quantize, stored=stored)
    # Before the weights: a vocabulary pocketlm cannot read is said before a long load.
    tokenizer = Tokenizer.from_gguf_metadata(checkpoint.metadata)
    # Known before any tensor is read: the matrices an adapter changes are merged in
    # float, so they are dequantized like the others rather than loaded as stored.
    factors = {} if adapter is None else fit_adapter(adapter, model)
    direct: Direct = {}
    if quantize is not None:
        direct = _direct_matrices(checkpoint, model, quantize=quantize, merged=factors)
        # As this path always has: beside quantized layers the rest stays fp32 (and so
        # do the activations), whatever `dtype` says.
        dtype = torch.float32
    # Never read: an untouched torch.empty is not committed memory; replaced below.
    placeholders = ((name, torch.empty(shape)) for name, (_, _, shape) in direct.items())
    tensors = chain(gguf_tensors(checkpoint, dtype=dtype, skip=direct), placeholders)
    kind = checkpoint.config["model_type"]
    assign_tensors(model, tensors, model_type=kind, dtype=dtype, device=device, source=path)
    if adapter is not None:
        merge_adapter(model, factors, scale=adapter.config.scale)
    if quantize == STORED:
        _keep_stored(model, direct, model_type=kind)
    elif quantize is not None:
        _quantize_gguf(model, direct, quantize=quantize, device=device)
    return LoadedModel(model, tokenizer, checkpoint.config, path, native=True)


def _direct_matrices(
    checkpoint: GGUFCheckpoint, model: nn.Module, *, quantize: str, merged: dict[str, Any]
) -> Direct:
    """The nn.Linear weights whose stored type this quantization's layers take as they
    are: Q8_0 into Int8Linear and, for int4, Q4_0/Q4_1 into Int4Linear with the file's
    own codes; as stored, every quantized or half matrix and the embedding; not those an
    adapter changes (names of `merged`)."""
    kinds = (nn.Linear, nn.Embedding) if quantize == STORED else (nn.Linear,)
    linears = {f"{name}.weight" for name, m in model.named_modules() if type(m) in kinds}
    changed = {f"{name}.weight" for name in merged}
    return {
        name: (kind, data, shape)
        for name, (kind, data, shape) in gguf_raw_tensors(checkpoint).items()
        if name in linears - changed and _direct_kind(kind, shape, quantize)
    }


def _direct_kind(kind: str, shape: tuple[int, ...], quantize: str) -> bool:
    """Whether a GGUF matrix of this type loads straight into this quantization's layers."""
    if quantize == STORED:
        return kind in STORED_TYPES and len(shape) == 2
    if kind == "Q8_0":
        return True
    return quantize == "int4" and kind in Q4_BLOCK_BYTES and Int4Linear.fits(*shape)


def _quantize_gguf(
    model: nn.Module, direct: Direct, *, quantize: str, device: torch.device | str
) -> None:
    """Put the `direct` matrices' quantized layers in place of their placeholders, then
    quantize the rest (a tied head, matrices of other types)."""
    for name, (kind, data, shape) in direct.items():
        module_name = name.removesuffix(".weight")
        linear = model.get_submodule(module_name)
        bias = None if linear.bias is None else linear.bias.detach().float()
        if kind == "Q8_0":
            weight, scales = q8_0_to_int8(data, shape)
            layer = Int8Linear(weight.to(device), scales.to(device), bias)
        else:
            layer = Int4Linear(*q4_to_int4(data, kind, shape), bias)
        _replace(model, module_name, layer)
    # Here rather than in `prepare`, which fuses first: fusing concatenates layers of one
    # kind, and q/k/v may be stored in different types (int8 from the file beside float).
    (quantize_int4 if quantize == "int4" else quantize_int8)(model)


def _keep_stored(model: nn.Module, direct: Direct, *, model_type: str) -> None:
    """Put a GGUFLinear (GGUFEmbedding) on the file's bytes in place of each `direct`
    matrix's placeholder, a matrix at a time (each entry's memory map dropped once used);
    a tied head shares the embedding's."""
    while direct:
        name, (kind, data, shape) = direct.popitem()
        matrix = gguf_matrix(data, kind, shape)
        del data
        module_name = name.removesuffix(".weight")
        old = model.get_submodule(module_name)
        if isinstance(old, nn.Embedding):
            new = GGUFEmbedding(matrix)
        else:
            new = GGUFLinear([matrix], None if old.bias is None else old.bias.detach().float())
        _replace(model, module_name, new)
    head, embedding = tables.TIED_KEYS[tables.family(model_type)]
    embedder = model.get_submodule(embedding.removesuffix(".weight"))
    if model.config.tie_word_embeddings and isinstance(embedder, GGUFEmbedding):
        _replace(model, head.removesuffix(".weight"), GGUFLinear([embedder.matrix]))


def _replace(model: nn.Module, module_name: str, layer: nn.Module) -> None:
    """Put `layer` where the submodule `module_name` is."""
    parent, _, attr = module_name.rpartition(".")
    setattr(model.get_submodule(parent), attr, layer)


def empty_model(config: dict[str, Any], *, source: Path) -> nn.Module:
    """The native model `config` describes, checked (weights.config) and built on the
    `meta` device: shapes and names, no memory."""
    _, model_cls = ARCHITECTURES[config["model_type"]]
    model_config = check_config(config, source=source)
    with torch.device("meta"):
        return model_cls(model_config)


def assign_tensors(
    model: nn.Module,
    tensors: Iterator[tuple[str, torch.Tensor]],
    *,
    model_type: str,
    dtype: torch.dtype,
    device: torch.device | str,
    source: Path,
) -> nn.Module:
    """Assign each (name, tensor) to the `meta` model after checking it; returns it.

    `tensors` yields our parameter names in nn.Linear orientation; each is converted to
    `dtype` on `device` as it arrives, so peak memory is the model plus one tensor."""
    expected = {name: p.shape for name, p in model.named_parameters()}  # tied weights appear once
    head, embedding = tables.TIED_KEYS[tables.family(model_type)]
    tied = model.config.tie_word_embeddings
    seen = set()
    for name, tensor in tensors:
        if tied and name == head:
            continue  # some tied checkpoints store the shared matrix twice
        if name not in expected:
            raise CorruptModelError(
                f"{source}: unexpected tensor {name!r}; is this a {model_type} checkpoint?"
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
    if tied:
        _assign(model, head, model.get_parameter(embedding))
    model.init_buffers(device)
    return model.eval().requires_grad_(False)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if not isinstance(tensor, nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=False)
    setattr(module, attr, tensor)


def _hf_tensors(path: Path, model_type: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor) pairs from safetensors shards (or a weights_only .bin)."""
    mxfp4: dict[str, dict[str, torch.Tensor]] = {}  # GPT-OSS: blocks waiting for scales
    for key, tensor in _raw_hf_tensors(path):
        if tables.is_ignored(key, model_type):
            continue
        name = tables.rename(key, model_type)
        if m := tables.MXFP4_PARTS.fullmatch(name):
            parts = mxfp4.setdefault(m[1], {})
            parts[m[2]] = tensor
            if len(parts) < 2:
                continue
            name, tensor = m[1], _mxfp4_experts(path, m[1], mxfp4.pop(m[1]))
        if (experts := tables.split_experts(name, tensor, model_type)) is not None:
            yield from experts
            continue
        if tables.is_transposed(name, model_type):
            if tensor.dim() != 2:
                raise CorruptModelError(
                    f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, expected a matrix"
                )
            tensor = tensor.t()
        yield name, tensor
    if mxfp4:
        name = next(iter(mxfp4))
        raise CorruptModelError(f"{path}: {name} has MXFP4 blocks or scales, not both")


def _mxfp4_experts(path: Path, name: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """A GPT-OSS expert tensor from its MXFP4 blocks and scales, in float32 and in the
    (E, in, out) order of the unquantized checkpoints (which split_experts reads)."""
    blocks, scales = parts["blocks"], parts["scales"]
    if blocks.dtype != torch.uint8 or blocks.dim() != 4 or blocks.shape[:-1] != scales.shape:
        raise CorruptModelError(
            f"{path}: {name}'s MXFP4 blocks {tuple(blocks.shape)} and scales "
            f"{tuple(scales.shape)} do not match (expected (E, rows, G, 16) uint8 and (E, rows, G))"
        )
    return dequant.hf_mxfp4(blocks, scales).transpose(1, 2)  # (E, out, in) -> (E, in, out)


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
