"""GGUF block formats repacked, losslessly, into pocketlm's few kernel layouts.

Every quantized GGUF type stores a weight as w = S * (c - offset) [+ min], with c a small
unsigned integer code and S a scale that is either an f16 per 32 weights (Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, IQ4_NL; MXFP4's power-of-two scale per 32 becomes one) or an f16 per
256 times a small integer per 16 or 32 weights (the K types and IQ4_XS). So one layout
family holds them all, differing only in:

- the code planes, per 64 weights: a low plane of 4 bits (32 bytes: byte j holds codes j
  and j + 32), 2 bits (16 bytes: byte j holds codes j, j+16, j+32, j+48) or 8 bits, and
  an optional high plane of 1 bit (8 bytes, bit j = code j's) or 2 bits (as the low one);
  a code is low | high << low_bits. Q4*: 4; Q5*: 4+1; Q6_K: 4+2; Q8_0: 8; Q2_K: 2;
  Q3_K: 2+1. Q8_0's signed q is stored as c = q + 128, so every code is unsigned (the
  operand VNNI multiplies unsigned);
- the scale record, one per 64 weights ("b32": two f16 scales, then two f16 mins if
  any) or per 256 ("k": f16 d, f16 dmin if mins, the per-16 or per-32 integer scales as
  int8, then the integer mins as uint8; Q2_K keeps its own scale|min<<4 nibble bytes);
- an integer offset (a power of two, or 0) and, for IQ4_NL / IQ4_XS and MXFP4, a
  16-entry table the codes index (their non-linear values, or FP4 E2M1's doubled, + 128).
  MXFP4's scale, 2^(e - 128) for its E8M0 byte e (the half that pairs with the doubled
  values), is an exact f16 from 2^-24 to 2^15; a block scaled below that (an all-zero
  block has e = 0) becomes zeros, one above is refused.

A matrix (N, K) is kept as `codes` (N/4, K/64, 4, code bytes) and `records` (N/4,
K/group, 4, record bytes): four rows interleaved chunk by chunk, so a decode thread
streams one contiguous stretch (as the int8 kernel does); N is padded to 4 rows and a
32-weight type's K to 64 with zeros (a zero code and a zero scale contribute nothing).

Bytes per 256 weights, file -> here: MXFP4 136 -> 144, Q4_0 144 -> 144, Q4_1 160 -> 160, Q5_0 176 -> 176,
Q5_1 192 -> 192, Q8_0 272 -> 272, IQ4_NL 144 -> 144, Q2_K 84 -> 84, Q3_K 110 -> 114 (its
6-bit scales unpacked), Q4_K 144 -> 148 and Q5_K 176 -> 180 (idem), Q6_K 210 -> 210,
IQ4_XS 136 -> 138: a Q4_K matrix stays 4.6 bits a weight.

Why this family and not another:
- One kernel: the decode kernel is one template over (low bits, high bits, scale
  scheme), twelve instances (MXFP4 shares IQ4_NL's), so every type gets the same streaming, prefetching and VNNI
  inner loop, and a new type is a row of LAYOUTS. Unpacking 64 codes is 2-4 instructions
  whatever the type: a 32-byte load and two masks (4 bits), a 16-byte broadcast and one
  variable shift (2 bits), a mask register (a fifth bit); gguf's own interleavings differ
  per type (Q6_K alone has three).
- Exact and compact: a per-32 float scale and min for Q4_K is exact only in fp32
  (d * sub has up to 17 significant bits, more than an f16 holds), 6 bits a weight. gguf's
  own factoring, d (f16) per 256 times the integer per 32, is exact at 4.625 bits; the
  kernel forms d * sub once per 256 weights and row. Q2_K keeps its scale|min nibble
  bytes (unpacked it would take 3.1 bits a weight, not 2.6).
- Unsigned codes and an integer offset: VNNI (vpdpbusd) multiplies unsigned bytes by
  signed ones, x's. The offset is where its sums start (-offset * the sum of x's four),
  so the signed types (Q4_0's q - 8, Q6_K's q - 32, Q8_0, IQ4's table + 128) cost nothing
  more than the others; every layout has an offset or float mins, never both.
- Rows interleaved by four: each thread's share of a matrix is one stream read front to
  back (the int8 kernel's lesson: ~50 GB/s where PyTorch's kernel, row by row, read ~30).

`dequantize` is bit-identical to `gguf.quants.dequantize` (tests/test_gguf_kernels.py):
it performs gguf's float32 operations in gguf's order -- S = d * float(sub) first, then
S * q, then + m or - dmin * sub_min -- and never adds a zero min (which would turn a -0.0
into +0.0). Everything here is vectorised torch over a chunk of rows; `repack` has a C++
twin (gguf_gemv.cpp's gguf_repack, equal byte for byte) that it uses where pocketlm's
kernels are had: PyTorch's version moves 1-30 MB/s of GGUF bytes, the C++ one 0.5-5 GB/s
on one core, and a 7B file holds 4 GB of them.

Knows nothing of files or models; the C++ kernels that read these layouts mirror them
(gguf_gemv.cpp). (ggml-quants.c `dequantize_row_*`; gguf-py `gguf.quants`.)
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from pocketlm.errors import PocketLMError
from pocketlm.kernels.cpp import gguf_ops

ROWS = 4  # weight rows interleaved
CHUNK = 64  # weights of a row read at a time
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# FP4 E2M1's eight magnitudes and their negatives, doubled to integers (ggml's kvalues_mxfp4).
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
TABLES = {1: IQ4_VALUES, 2: MXFP4_VALUES}  # Layout.table -> the values its codes index
_ROW_CHUNK = 256  # rows repacked or dequantized at a time: temporaries of a few MB


@dataclass(frozen=True)
class Layout:
    """How one GGUF type's weights are held; see the module docstring."""

    ggml_type: str
    block_bytes: int  # bytes of one GGUF block in the file
    low: int  # bits of the low code plane: 2, 4 or 8
    high: int  # bits of the high code plane: 0, 1 or 2
    scheme: str  # "b32": an f16 scale per 32 weights; "k": f16 d per 256 x int per `sub`
    sub: int  # weights per scale: 32, or 16 (Q2_K, Q3_K, Q6_K)
    mins: int  # 0: none; 1: f16 min per 32 (b32) or dmin x uint8 per sub (k); 2: Q2_K nibbles
    offset: int  # w = S * (c - offset) when there is no min
    table: int  # 0, or which TABLES entry (+ 128) the codes index: 1 IQ4, 2 MXFP4

    @property
    def group(self) -> int:
        """Weights per scale record."""
        return CHUNK if self.scheme == "b32" else 256

    @property
    def code_bytes(self) -> int:
        """Bytes of 64 codes."""
        return 8 * (self.low + self.high)

    @property
    def record_bytes(self) -> int:
        if self.scheme == "b32":
            return 4 * (1 + self.mins)
        subs = 256 // self.sub
        return 2 + 2 * (self.mins > 0) + subs + subs * (self.mins == 1)

    def params(self) -> list[int]:
        """The layout as the C++ kernels take it."""
        scheme = 0 if self.scheme == "b32" else 1
        return [self.low, self.high, scheme, self.sub, self.mins, self.offset, self.table]

    def table_bytes(self) -> torch.Tensor | None:
        """The 16 values the codes index, + 128 as the unsigned codes the kernel makes."""
        if not self.table:
            return None
        return torch.tensor([v + 128 for v in TABLES[self.table]], dtype=torch.uint8)

    def padded_k(self, k: int) -> int:
        return -(-k // self.group) * self.group


LAYOUTS = {
    layout.ggml_type: layout
    for layout in (
        Layout("Q4_0", 18, 4, 0, "b32", 32, 0, 8, 0),
        Layout("Q4_1", 20, 4, 0, "b32", 32, 1, 0, 0),
        Layout("IQ4_NL", 18, 4, 0, "b32", 32, 0, 128, 1),
        Layout("Q5_0", 22, 4, 1, "b32", 32, 0, 16, 0),
        Layout("Q5_1", 24, 4, 1, "b32", 32, 1, 0, 0),
        Layout("Q8_0", 34, 8, 0, "b32", 32, 0, 128, 0),
        Layout("Q2_K", 84, 2, 0, "k", 16, 2, 0, 0),
        Layout("Q3_K", 110, 2, 1, "k", 16, 0, 4, 0),
        Layout("Q4_K", 144, 4, 0, "k", 32, 1, 0, 0),
        Layout("Q5_K", 176, 4, 1, "k", 32, 1, 0, 0),
        Layout("Q6_K", 210, 4, 2, "k", 16, 0, 32, 0),
        Layout("IQ4_XS", 136, 4, 0, "k", 32, 0, 128, 1),
        Layout("MXFP4", 17, 4, 0, "b32", 32, 0, 128, 2),
    )
}


# --- GGUF blocks -> codes (n, blocks, weights) and scale fields ------------------------


def _bits(b: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """(..., L) bytes -> (..., len(shifts), L): the bit fields at `shifts`, masked."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=b.device).view(len(shifts), 1)
    return (b.unsqueeze(-2) >> s) & mask


def _qh32(b: torch.Tensor) -> torch.Tensor:
    """(..., 4) bytes of a little-endian uint32 -> (..., 32), bit j in column j."""
    return _bits(b, tuple(range(8)), 1).transpose(-1, -2).reshape(*b.shape[:-1], 32)


def _nib32(qs: torch.Tensor) -> torch.Tensor:
    """(..., 16) bytes of a 32-weight block -> (..., 32): low nibbles, then high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: (..., 12) bytes -> 8 six-bit scales and 8 six-bit mins, uint8."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _e8m0_half_f16(e: torch.Tensor) -> torch.Tensor:
    """MXFP4's E8M0 scale bytes (...) -> the f16 bytes (..., 2) of 2^(e - 128): exact
    from 2^-24 (a subnormal) to 2^15; below, zero. `repack` refuses larger ones."""
    x = e.int() - 128
    normal = (x + 15).clamp(min=0) << 10
    subnormal = torch.where(x >= -24, 1 << (x + 24).clamp(0, 9), 0)
    bits = torch.where(x >= -14, normal, subnormal).to(torch.int16)
    return bits.unsqueeze(-1).view(torch.uint8)  # little-endian, as the file's f16s


def _parse_b32(b: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """32-weight blocks (n, B, bytes) -> codes (n, B, 32), d (n, B, 2) [, m]."""
    if kind == "MXFP4":
        return {"codes": _nib32(b[..., 1:]), "d": _e8m0_half_f16(b[..., 0])}
    if kind == "Q8_0":
        return {"codes": b[..., 2:] ^ 0x80, "d": b[..., :2]}  # q + 128
    if kind in ("Q4_0", "IQ4_NL"):
        return {"codes": _nib32(b[..., 2:]), "d": b[..., :2]}
    if kind == "Q4_1":
        return {"codes": _nib32(b[..., 4:]), "d": b[..., :2], "m": b[..., 2:4]}
    if kind == "Q5_0":
        return {"codes": _nib32(b[..., 6:]) | (_qh32(b[..., 2:6]) << 4), "d": b[..., :2]}
    codes = _nib32(b[..., 8:]) | (_qh32(b[..., 4:8]) << 4)  # Q5_1
    return {"codes": codes, "d": b[..., :2], "m": b[..., 2:4]}


def _parse_k(b: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """256-weight super-blocks (n, B, bytes) -> codes (n, B, 256), d (n, B, 2) [, dmin],
    sub (n, B, subs) [, submin], as the file orders the weights."""
    n, nb = b.shape[:2]
    if kind == "Q2_K":
        codes = _bits(b[..., 16:80].reshape(n, nb, 2, 32), (0, 2, 4, 6), 3)
        return {"codes": codes, "d": b[..., 80:82], "dmin": b[..., 82:84], "sub": b[..., :16]}
    if kind == "Q3_K":
        low = _bits(b[..., 32:96].reshape(n, nb, 2, 32), (0, 2, 4, 6), 3).reshape(n, nb, 256)
        high = _bits(b[..., :32], tuple(range(8)), 1).reshape(n, nb, 256)
        lo = _bits(b[..., 96:104], (0, 4), 0x0F).reshape(n, nb, 16)
        hi = _bits(b[..., 104:108], (0, 2, 4, 6), 3).reshape(n, nb, 16)
        sub = ((lo | (hi << 4)).to(torch.int16) - 32).to(torch.int8)
        return {"codes": low | (high << 2), "d": b[..., 108:110], "sub": sub}
    if kind == "Q6_K":
        low = _bits(b[..., :128].reshape(n, nb, 2, 64), (0, 4), 0x0F).reshape(n, nb, 256)
        high = _bits(b[..., 128:192].reshape(n, nb, 2, 32), (0, 2, 4, 6), 3)
        sub = b[..., 192:208].contiguous().view(torch.int8)
        return {"codes": low | (high.reshape(n, nb, 256) << 4), "d": b[..., 208:210], "sub": sub}
    if kind == "IQ4_XS":
        lo = _bits(b[..., 4:8], (0, 4), 0x0F).transpose(-1, -2).reshape(n, nb, 8)
        h = b[..., 2].int() | (b[..., 3].int() << 8)  # (n, B) uint16 value
        hi = (h.unsqueeze(-1) >> (2 * torch.arange(8, device=b.device))) & 3
        sub = ((lo.int() | (hi << 4)) - 32).to(torch.int8)
        codes = _bits(b[..., 8:].reshape(n, nb, 8, 16), (0, 4), 0x0F)
        return {"codes": codes, "d": b[..., :2], "sub": sub}
    sc, mn = _k_scale_min(b[..., 4:16])  # Q4_K, Q5_K
    low = _bits(b[..., -128:].reshape(n, nb, 4, 32), (0, 4), 0x0F).reshape(n, nb, 256)
    if kind == "Q5_K":
        low = low | (_bits(b[..., 16:48], tuple(range(8)), 1).reshape(n, nb, 256) << 4)
    return {"codes": low, "d": b[..., :2], "dmin": b[..., 2:4], "sub": sc, "submin": mn}


# --- codes and fields -> pocketlm's planes and records ----------------------------------


def _pack_plane(c: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., 64) codes of `bits` bits -> (..., 8 * bits) bytes, as the module docstring."""
    if bits == 8:
        return c
    if bits == 4:
        return c[..., :32] | (c[..., 32:] << 4)
    if bits == 1:
        weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=c.device)
        return (c.view(*c.shape[:-1], 8, 8) * weights).sum(-1, dtype=torch.uint8)
    q = c.view(*c.shape[:-1], 4, 16)  # 2 bits: code j + 16 i at bits 2i of byte j
    return q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)


def _unpack_plane(p: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `_pack_plane`."""
    if bits == 8:
        return p
    if bits == 4:
        return torch.cat([p & 0x0F, p >> 4], dim=-1)
    if bits == 1:
        return _bits(p, tuple(range(8)), 1).transpose(-1, -2).reshape(*p.shape[:-1], 64)
    return _bits(p, (0, 2, 4, 6), 3).reshape(*p.shape[:-1], 64)  # 2 bits


def _records(layout: Layout, f: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """Scale fields -> records (n, K/group, record bytes) uint8."""
    as_bytes = [f["d"], f.get("m")] if layout.scheme == "b32" else [f["d"], f.get("dmin")]
    if layout.scheme == "b32":  # two 32-blocks per record
        parts = [t.reshape(n, -1, 4) for t in as_bytes if t is not None]
    else:
        subs = [f["sub"].contiguous().view(torch.uint8), f.get("submin")]
        parts = [t for t in as_bytes + subs if t is not None]
    return torch.cat(parts, dim=-1)


def _interleave(t: torch.Tensor, rows: int) -> torch.Tensor:
    """(n, C, B) -> (ceil(n/4), C, 4, B), zero rows padding the last block."""
    padded = -(-rows // ROWS) * ROWS
    if padded > rows:
        t = torch.cat([t, t.new_zeros(padded - rows, *t.shape[1:])])
    return t.view(padded // ROWS, ROWS, *t.shape[1:]).transpose(1, 2).contiguous()


def repack(raw: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """GGUF bytes of an (N, K) matrix -> (codes, records): pocketlm's layout of it, by the
    C++ op where the kernels are had (GB/s), else in PyTorch a chunk of rows at a time
    (never the matrix in float); the same bytes either way."""
    layout = layout_of(ggml_type)
    n, k = shape
    per_row = k // (32 if layout.scheme == "b32" else 256) * layout.block_bytes
    if k % (32 if layout.scheme == "b32" else 256) or np.asarray(raw).size != n * per_row:
        raise PocketLMError(f"{ggml_type} bytes of {np.asarray(raw).size} do not hold {shape}")
    if ggml_type == "MXFP4" and (e := np.asarray(raw).reshape(-1, 17)[:, 0]).max() > 143:
        raise PocketLMError(
            f"an MXFP4 block is scaled by 2^{int(e.max()) - 128}, beyond what pocketlm's "
            "kernels hold (2^15); the file is damaged or was not made by llama.cpp"
        )
    if (ops := gguf_ops()) is not None:
        return tuple(ops.gguf_repack(_byte_view(raw), layout.params(), n, k))
    return _repack_torch(np.asarray(raw).reshape(n, per_row), layout, k)


def _byte_view(raw: np.ndarray) -> torch.Tensor:
    """The bytes as a flat uint8 tensor on the same memory, not a copy of a file's map.
    Such a map is read-only, which PyTorch warns of; gguf_repack only reads it."""
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(flat)


def _repack_torch(rows: np.ndarray, layout: Layout, k: int) -> tuple[torch.Tensor, ...]:
    """`repack` in PyTorch, on the matrix's bytes as (N, row bytes)."""
    n, kp = len(rows), layout.padded_k(k)
    codes, records = [], []
    for start in range(0, n, _ROW_CHUNK):
        b = torch.from_numpy(np.array(rows[start : start + _ROW_CHUNK]))
        m = len(b)
        b = b.view(m, -1, layout.block_bytes)
        fields = (_parse_b32 if layout.scheme == "b32" else _parse_k)(b, layout.ggml_type)
        c = fields["codes"].reshape(m, k)
        if kp > k:  # a 32-weight type's odd block: zero codes and zero scales
            c = torch.cat([c, c.new_zeros(m, kp - k)], dim=1)
            fields = {name: _pad_blocks(t) for name, t in fields.items() if name != "codes"}
        c = c.view(m, kp // CHUNK, CHUNK)
        planes = [_pack_plane(c & ((1 << layout.low) - 1), layout.low)]
        if layout.high:
            planes.append(_pack_plane(c >> layout.low, layout.high))
        codes.append(torch.cat(planes, dim=-1))
        records.append(_records(layout, fields, m))
    return _interleave(torch.cat(codes), n), _interleave(torch.cat(records), n)


def _pad_blocks(t: torch.Tensor) -> torch.Tensor:
    """One zero 32-weight block more on axis 1 (a b32 field (n, B, bytes))."""
    return torch.cat([t, t.new_zeros(t.shape[0], 1, *t.shape[2:])], dim=1)


def layout_of(ggml_type: str) -> Layout:
    if ggml_type not in LAYOUTS:
        raise PocketLMError(
            f"pocketlm's kernels take GGUF types {', '.join(LAYOUTS)}, not {ggml_type}"
        )
    return LAYOUTS[ggml_type]


# --- pocketlm's layout -> float32, bit for bit gguf's ----------------------------------


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2j) little-endian f16 bytes -> (..., j) float32."""
    return b.contiguous().view(torch.float16).float()


def dequantize(
    layout: Layout,
    codes: torch.Tensor,
    records: torch.Tensor,
    *,
    k: int,
    rows: tuple[int, int],
) -> torch.Tensor:
    """Rows [start, stop) of the matrix in (codes, records), K = k -> float32 weights, a
    chunk of rows at a time; equal bit for bit to gguf's dequantizer on the file's bytes."""
    start, stop = rows
    out = torch.empty((stop - start, k), dtype=torch.float32, device=codes.device)
    step = _ROW_CHUNK // ROWS
    for block in range(start // ROWS, -(-stop // ROWS), step):
        end = min(block + step, -(-stop // ROWS))
        w = _dequantize_blocks(layout, codes[block:end], records[block:end])  # rows 4 block..
        first = max(start - block * ROWS, 0)
        w = w[first : first + stop - max(start, block * ROWS), :k]
        at = max(block * ROWS - start, 0)
        out[at : at + len(w)] = w
    return out


def _dequantize_blocks(layout: Layout, codes: torch.Tensor, records: torch.Tensor) -> torch.Tensor:
    """Interleaved row blocks (b, K/64, 4, bytes), (b, K/group, 4, bytes) -> (4b, Kp)."""
    c = codes.transpose(1, 2).reshape(-1, codes.shape[1], codes.shape[3])  # (n, K/64, bytes)
    rec = records.transpose(1, 2).reshape(-1, records.shape[1], records.shape[3])
    n, kp = c.shape[0], c.shape[1] * CHUNK
    q = _unpack_plane(c[..., : 8 * layout.low], layout.low)
    if layout.high:
        q = q | (_unpack_plane(c[..., 8 * layout.low :], layout.high) << layout.low)
    q = q.reshape(n, kp)
    if layout.table:
        q = layout.table_bytes().to(q.device)[q.long()]
    if layout.scheme == "b32":
        scale = _f16(rec[..., :4]).reshape(n, -1, 1)  # (n, K/32, 1)
        groups = q.view(n, -1, 32)
        if layout.mins:
            return (scale * groups.float() + _f16(rec[..., 4:8]).reshape(n, -1, 1)).view(n, kp)
        return (scale * (groups.to(torch.int16) - layout.offset).float()).view(n, kp)
    subs = 256 // layout.sub
    start = 4 if layout.mins else 2
    sub = rec[..., start : start + subs]
    sub = (sub & 0x0F) if layout.mins == 2 else sub.contiguous().view(torch.int8)
    scale = (_f16(rec[..., :2]) * sub.float()).reshape(n, -1, 1)  # (n, K/sub, 1)
    groups = q.view(n, -1, layout.sub)
    if not layout.mins:
        return (scale * (groups.to(torch.int16) - layout.offset).float()).view(n, kp)
    submin = rec[..., start + subs :] if layout.mins == 1 else rec[..., start : start + subs] >> 4
    low = (_f16(rec[..., 2:4]) * submin.float()).reshape(n, -1, 1)
    return (scale * groups.float() - low).view(n, kp)
