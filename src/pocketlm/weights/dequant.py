"""GGML block formats -> torch tensors: dequantization of GGUF tensor bytes.

A GGUF tensor is a run of fixed-size blocks; each block holds `block_size` weights in
`type_size` bytes (a float16 scale or two, then packed integers). The float types decode
here; the quantized ones through the layouts pocketlm's kernels keep them in
(kernels/gguf_layouts.py: repacked losslessly, then dequantized by gguf's float32
operations in gguf's order), so one implementation of each block format serves loading
as stored and dequantizing alike, and the results agree with gguf-py's `gguf.quants` bit
for bit. This module knows nothing about file layout, tensor names or models.
"""

import math
from collections.abc import Callable

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from pocketlm.errors import PocketLMError
from pocketlm.kernels.gguf import QuantMatrix
from pocketlm.kernels.gguf_layouts import LAYOUTS

# Decode this many weights at a time, so the float32 temporaries of one chunk stay a few
# MB however large the tensor (a 1.5B model's embedding is 80M weights).
_CHUNK_WEIGHTS = 1 << 20

Decoder = Callable[[torch.Tensor], torch.Tensor]


# MXFP4's 16 code points (OCP microscaling FP4, e2m1), in the order HF's GPT-OSS
# checkpoints index them (transformers' integrations/mxfp4.py FP4_VALUES).
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def hf_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """An MXFP4 tensor as Hugging Face stores GPT-OSS's experts -> float32 (..., G * 32):
    `blocks` (..., G, 16) uint8, two 4-bit codes a byte (low nibble first), `scales`
    (..., G) uint8, a power of two per 32 values biased by 127 (as transformers'
    `convert_moe_packed_tensors`). In chunks: the codes become indices, 4 bytes each."""
    lut = torch.tensor(_E2M1)
    flat, powers = blocks.reshape(-1, 16), scales.reshape(-1, 1).int() - 127
    out = torch.empty(flat.shape[0], 32)
    for start in range(0, flat.shape[0], _CHUNK):
        block = flat[start : start + _CHUNK]
        codes = torch.stack((block & 0x0F, block >> 4), dim=-1).flatten(-2).int()  # (n, 32)
        out[start : start + _CHUNK] = torch.ldexp(lut[codes], powers[start : start + _CHUNK])
    return out.view(*blocks.shape[:-2], -1)


_CHUNK = 1 << 20  # blocks of 32 at a time


def ggml_type_name(type_id: int) -> str | None:
    """The ggml name of a tensor type id ("Q4_K"), or None when ggml has no such type."""
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return None


def ggml_type_sizes(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type, by name."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]


# --- float types: (N, bytes) uint8 -> (N, weights) float32 ------------------------------


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _bf16(b: torch.Tensor) -> torch.Tensor:
    # bf16 -> f32 is the 16 bits shifted up: exact, NaN payloads included.
    return b.contiguous().view(torch.bfloat16).float()


DECODERS: dict[str, Decoder] = {"F32": _f32, "F16": _f16, "BF16": _bf16}
SUPPORTED_TYPES = (*DECODERS, *LAYOUTS)


def dequantize(
    raw: np.ndarray,
    ggml_type: str,
    *,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    tensor_name: str = "tensor",
) -> torch.Tensor:
    """Decode the bytes of one GGML tensor (any uint8 array, e.g. a memory map) to `shape`.

    `raw` must hold exactly the tensor's blocks; its length is checked against `shape`.
    Decoding runs in float32 a chunk of blocks at a time; the result is cast to `dtype`.
    """
    decoder = DECODERS.get(ggml_type)
    if decoder is None and ggml_type not in LAYOUTS:
        raise PocketLMError(
            f"tensor {tensor_name} is stored as {ggml_type}, which pocketlm cannot dequantize; "
            f"use a GGUF quantized as one of {', '.join(SUPPORTED_TYPES)}"
        )
    block_size, type_size = ggml_type_sizes(ggml_type)
    n_weights = math.prod(shape)
    flat = raw.reshape(-1)
    if n_weights % block_size or flat.size != n_weights // block_size * type_size:
        raise PocketLMError(
            f"tensor {tensor_name}: {flat.size} bytes of {ggml_type} do not hold shape "
            f"{tuple(shape)}; the GGUF file is corrupt, download or convert it again"
        )
    if decoder is None:
        return _dequantize_blocks(flat, ggml_type, shape=shape, dtype=dtype)
    n_blocks = n_weights // block_size
    step = max(1, _CHUNK_WEIGHTS // block_size)
    if n_blocks <= step:
        return _decode(decoder, flat, n_blocks).to(dtype).view(shape)
    out = torch.empty((n_blocks, block_size), dtype=dtype)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        out[start:stop] = _decode(decoder, flat[start * type_size : stop * type_size], stop - start)
    return out.view(shape)


def _decode(decoder: Decoder, raw: np.ndarray, n_blocks: int) -> torch.Tensor:
    # np.array copies the bytes out of the (read-only) map into memory torch may own.
    blocks = torch.from_numpy(np.array(raw)).view(n_blocks, -1)
    return decoder(blocks)


def _dequantize_blocks(
    flat: np.ndarray, ggml_type: str, *, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """A quantized tensor through the kernels' own layouts (kernels.gguf.QuantMatrix, whose
    dequantization is gguf's bit for bit): repacked, then dequantized a chunk of rows at a
    time into the result."""
    k = shape[-1] if shape else 1
    rows = math.prod(shape) // k
    matrix = QuantMatrix.from_gguf(flat, ggml_type, (rows, k))
    out = torch.empty((rows, k), dtype=dtype)
    step = max(1, _CHUNK_WEIGHTS // k)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        out[start:stop] = matrix.dequantize(start, stop)
    return out.view(shape)
