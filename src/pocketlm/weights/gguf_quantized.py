"""GGUF matrices straight into quantized layers (temporary home; merged into the loader)."""

from pathlib import Path

import torch
from torch import nn

from pocketlm.kernels.int4 import Q4_BLOCK_BYTES, Int4Linear, q4_to_int4, quantize_int4
from pocketlm.kernels.int8 import Int8Linear, q8_0_to_int8, quantize_int8
from pocketlm.kernels.prepare import check_quantization, fuse


def load_gguf_quantized(path: Path, *, quantize: str, device: torch.device | str = "cpu"):
    """Load a GGUF with its matrices going straight to quantized layers, never to float:
    Q8_0 to Int8Linear and, for int4, Q4_0/Q4_1 to Int4Linear with the file's own codes.
    Every other tensor is dequantized to fp32 and quantized as `prepare` would. Returns a
    fused LoadedModel (`prepare` then has nothing left to do but pack)."""
    from pocketlm.tokenizer import Tokenizer
    from pocketlm.weights.dequant import dequantize
    from pocketlm.weights.gguf import gguf_raw_tensors, read_gguf
    from pocketlm.weights.loader import LoadedModel, build_model

    check_quantization(quantize, device=device)
    checkpoint = read_gguf(path)
    raw = gguf_raw_tensors(checkpoint)
    linears = _linear_weights(checkpoint.config)
    direct = {name for name, (kind, _, shape) in raw.items()
              if name in linears and _direct_kind(kind, shape, quantize)}  # fmt: skip

    def tensors():
        for name, (kind, data, shape) in raw.items():
            if name in direct:
                # Never read: an untouched torch.empty is not committed memory; replaced below.
                yield name, torch.empty(shape, dtype=torch.float32)
            else:
                yield (
                    name,
                    dequantize(data, kind, shape=shape, dtype=torch.float32, tensor_name=name),
                )

    model = build_model(
        checkpoint.config, tensors(), dtype=torch.float32, device=device, source=path
    )
    for name in direct:
        module_name = name.removesuffix(".weight")
        linear = model.get_submodule(module_name)
        bias = None if linear.bias is None else linear.bias.detach().float()
        kind, data, shape = raw[name]
        if kind == "Q8_0":
            weight, scales = q8_0_to_int8(data, shape)
            layer = Int8Linear(weight.to(device), scales.to(device), bias)
        else:
            layer = Int4Linear(*q4_to_int4(data, kind, shape), bias)
        parent, _, attr = module_name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
    # The rest (a tied head, matrices of other types), then fuse.
    (quantize_int4 if quantize == "int4" else quantize_int8)(model)
    fuse(model)
    tokenizer = Tokenizer.from_gguf_metadata(checkpoint.metadata)
    return LoadedModel(model, tokenizer, checkpoint.config, path, native=True)


def _direct_kind(kind: str, shape: tuple[int, ...], quantize: str) -> bool:
    """Whether a GGUF matrix of this type loads straight into this quantization's layers."""
    if kind == "Q8_0":
        return True
    return quantize == "int4" and kind in Q4_BLOCK_BYTES and Int4Linear.fits(*shape)


def _linear_weights(config: dict) -> set[str]:
    """Parameter names of the nn.Linear weights of the model `config` describes."""
    from pocketlm.models import ARCHITECTURES, build_config

    with torch.device("meta"):
        probe = ARCHITECTURES[config["model_type"]][1](build_config(config))
    return {f"{name}.weight" for name, m in probe.named_modules() if type(m) is nn.Linear}
