"""GGML block formats -> torch tensors: dequantization of GGUF tensor bytes.

A GGUF tensor is a run of fixed-size blocks; each block holds `block_size` weights in
`type_size` bytes (a float16 scale or two, then packed integers). Every decoder here takes
the blocks of one chunk as a (N, type_size) uint8 tensor and returns (N, block_size)
float32, vectorised over blocks: no Python loop ever walks the blocks one by one.

The arithmetic mirrors ggml's reference `dequantize_row_*` (ggml-quants.c) and gguf-py's
`gguf.quants` operation for operation, in float32, so the results agree bit for bit.
This module knows nothing about file layout, tensor names or models.
"""

import math
from collections.abc import Callable

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from pocketlm.errors import PocketLMError

QK_K = 256  # weights per "K-quant" super-block
# Decode this many weights at a time, so the float32 temporaries of one chunk stay a few
# MB however large the tensor (a 1.5B model's embedding is 80M weights).
_CHUNK_WEIGHTS = 1 << 20

Decoder = Callable[[torch.Tensor], torch.Tensor]


def ggml_type_name(type_id: int) -> str | None:
    """The ggml name of a tensor type id ("Q4_K"), or None when ggml has no such type."""
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return None


def ggml_type_sizes(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type, by name."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]


# --- helpers on (N, k) uint8 block columns --------------------------------------------


def _f16(col: torch.Tensor) -> torch.Tensor:
    """(N, 2) little-endian float16 bytes -> (N, 1) float32."""
    return col.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, k) packed bytes -> (N, 2k) float32: all low nibbles first, then all high ones."""
    k = qs.shape[1]
    q = torch.empty((qs.shape[0], 2 * k), dtype=torch.float32)
    q[:, :k] = qs & 0x0F
    q[:, k:] = qs >> 4
    return q


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """(N, 4) bytes of a little-endian uint32 -> (N, 32) with bit j of it in column j."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def _crumbs(qs: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """(N, G, 32) bytes -> (N, G, len(shifts), 32): the bit fields at `shifts`, masked."""
    s = torch.tensor(shifts, dtype=torch.uint8).view(1, 1, -1, 1)
    return (qs.unsqueeze(2) >> s) & mask


# --- 32-weight block formats ----------------------------------------------------------


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # d: f16 | qs: 32 x int8
    return b[:, 2:].contiguous().view(torch.int8).float().mul_(_f16(b[:, :2]))


# In-place float ops from here on: exact on these small integers, and each skips an
# allocation of the whole chunk. The rounding steps are ggml's: (q - offset) * d, d * q + m.


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # d: f16 | qs: 16 bytes of nibbles, offset by 8
    return _nibbles(b[:, 2:]).sub_(8).mul_(_f16(b[:, :2]))


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    # d: f16 | m: f16 | qs: 16 bytes of nibbles; x = d * q + m
    return _nibbles(b[:, 4:]).mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    # d: f16 | qh: uint32, the fifth bit of each weight | qs: 16 bytes of nibbles, offset 16
    q = _nibbles(b[:, 6:]).add_(_bits32(b[:, 2:6]), alpha=16)
    return q.sub_(16).mul_(_f16(b[:, :2]))


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    # d: f16 | m: f16 | qh: uint32 | qs: 16 bytes of nibbles; x = d * q + m
    q = _nibbles(b[:, 8:]).add_(_bits32(b[:, 4:8]), alpha=16)
    return q.mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


# --- 256-weight "K" super-block formats -------------------------------------------------


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, as float32 (N, 8)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    # scales: 16 bytes (4-bit scale | 4-bit min) | qs: 64 bytes of 2-bit | d: f16 | dmin: f16
    n = b.shape[0]
    scales, d, dmin = b[:, :16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = _crumbs(b[:, 16:80].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16)
    return (dl * q.float() - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    # hmask: 32 bytes (third bit, inverted) | qs: 64 bytes of 2-bit | scales: 12 | d: f16
    n = b.shape[0]
    d = _f16(b[:, 108:110])
    lo = _crumbs(b[:, 96:104].reshape(n, 1, 8), (0, 4), 0x0F).reshape(n, 16)
    hi = _crumbs(b[:, 104:108].reshape(n, 1, 4), (0, 2, 4, 6), 0x03).reshape(n, 16)
    scales = ((lo | (hi << 4)).to(torch.int16) - 32).float()
    dl = (d * scales).view(n, 16, 1)
    ql = _crumbs(b[:, 32:96].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16)
    qh = _crumbs(b[:, :32].reshape(n, 1, 32), tuple(range(8)), 1).reshape(n, 16, 16)
    q = ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)  # offset 4 when the bit is 0
    return (dl * q.float()).reshape(n, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    # d: f16 | dmin: f16 | scales: 12 bytes | qs: 128 bytes of nibbles, 64 weights per 32
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    q = _crumbs(b[:, 16:].reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32)
    return ((d * sc).view(n, 8, 1) * q.float() - (dmin * mn).view(n, 8, 1)).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    # d: f16 | dmin: f16 | scales: 12 | qh: 32 bytes (fifth bits) | qs: 128 bytes of nibbles
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    ql = _crumbs(b[:, 48:].reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32)
    qh = _crumbs(b[:, 16:48].reshape(n, 1, 32), tuple(range(8)), 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return ((d * sc).view(n, 8, 1) * q - (dmin * mn).view(n, 8, 1)).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # ql: 128 bytes (low 4 bits) | qh: 64 bytes (high 2 bits) | scales: 16 x int8 | d: f16
    n = b.shape[0]
    ql = _crumbs(b[:, :128].reshape(n, 2, 64), (0, 4), 0x0F).reshape(n, 8, 32)
    qh = _crumbs(b[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(b[:, 208:210])
    return ((d * scales).view(n, 16, 1) * q).reshape(n, QK_K)


# --- plain float formats, as one-weight "blocks" ----------------------------------------


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _f16_plain(b: torch.Tensor) -> torch.Tensor:
    return _f16(b)


def _bf16(b: torch.Tensor) -> torch.Tensor:
    # bf16 -> f32 is the 16 bits shifted up: exact, NaN payloads included.
    return b.contiguous().view(torch.bfloat16).float()


DECODERS: dict[str, Decoder] = {
    "F32": _f32,
    "F16": _f16_plain,
    "BF16": _bf16,
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
SUPPORTED_TYPES = tuple(DECODERS)


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
    if decoder is None:
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
