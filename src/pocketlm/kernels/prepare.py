"""Make a loaded model ready for fast inference: fuse projections, then quantize or
re-lay-out each matmul for the device.

The one entry point the loader uses. Knows nothing of files, tokenizers or sampling.
"""

import torch
from torch import nn

from pocketlm.errors import PocketLMError
from pocketlm.kernels.int4 import Int4Linear, quantize_int4
from pocketlm.kernels.int8 import Int8Linear, quantize_int8
from pocketlm.kernels.split import split_linears

QUANTIZATIONS = ("int8", "int4")


def fuse(model: nn.Module) -> nn.Module:
    """Fuse projections that share an input (Llama q/k/v, gate/up) where the model can."""
    if hasattr(model, "fuse"):
        model.fuse()
    return model


def prepare(model: nn.Module, *, quantize: str | None = None) -> nn.Module:
    """Make a loaded model ready for fast inference: fuse projections, then quantize, or
    in fp32 on a CPU split each matmul between the threads (pocketlm.kernels.split)."""
    check_quantization(quantize, device=next(model.parameters()).device)
    fuse(model)
    if quantize == "int8":
        quantize_int8(model)
    elif quantize == "int4":
        quantize_int4(model)
    split_linears(model)  # what is still an fp32 nn.Linear on a CPU
    for module in model.modules():
        if isinstance(module, (Int4Linear, Int8Linear)):
            module.pack()
    return model


def check_quantization(quantize: str | None, *, device: torch.device | str) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise PocketLMError(
            f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}"
        )
    if quantize == "int4" and torch.device(device).type != "cpu":
        raise PocketLMError("int4 runs on the CPU only; on a GPU use --quantize int8 or bf16")
