"""GGUF matrices kept as the file stores them and multiplied without a float copy:
`GGUFLinear`, made of `QuantMatrix` (any of the twelve quantized types, in the layouts of
gguf_layouts.py) and `DenseMatrix` (BF16/F16 kept in their dtype, F32) parts.

A decode step (up to DECODE_MAX_ROWS rows) multiplies the packed weights directly with
pocketlm's C++ kernels (gguf_gemv.cpp: AVX-512 VNNI, each row of x quantized to int8 per
32 values as llama.cpp does; bf16/f16 weights with fp32 activations). A prefill
dequantizes a tile of rows at a time to bf16 and uses the bf16 matmul. Where the kernels
cannot be had (pocketlm.kernels.cpp says which path runs, once), both dequantize a tile
of rows exactly to float32 and use the fp32 matmul: slower, and the reference the kernels
are tested against.

Precision, against the file's weights in float32 with fp32 activations: the decode kernel
computes dequantize(W) @ x_q exactly up to fp32 rounding, where x_q is x rounded to
multiples of max|x|/127 per 32 values (an error of at most half a step per value); the
prefill rounds x and the weights to bf16 (2^-9 relative each).

Projections that share an input (q/k/v, gate/up) fuse by `concat`: parts of one layout
become one matrix (when the first's rows fill whole blocks of four), others stay side by
side (a Q4_K_M file's Q4_K q and k beside a Q6_K v).

Dimension letters: M = rows of x, N = out features, K = in features.
Knows nothing of files (it takes a tensor's bytes), models or tokenizers.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.errors import PocketLMError
from pocketlm.kernels.cpp import gguf_ops
from pocketlm.kernels.gguf_layouts import (
    CHUNK,
    LAYOUTS,
    ROWS,
    Layout,
    dequantize,
    layout_of,
    repack,
)

# Up to this many rows the decode kernels read the packed weights directly; beyond it a
# prefill dequantizes tiles and uses the bf16 matmul. (See benchmarks/gguf_kernels.py.)
DECODE_MAX_ROWS = 32
_TILE_WEIGHTS = 1 << 22  # weights dequantized at a time in a prefill: 8 MB of bf16
DENSE_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# The GGUF types a matrix can be kept in as stored (F32 matrices stay plain nn.Linear).
STORED_TYPES = frozenset(LAYOUTS) | {"F16", "BF16"}


def gguf_matrix(raw: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> nn.Module:
    """A QuantMatrix or DenseMatrix from a matrix's GGUF bytes, rows in nn.Linear
    orientation (N, K)."""
    kind = DenseMatrix if ggml_type in DENSE_TYPES else QuantMatrix
    return kind.from_gguf(raw, ggml_type, shape)


def packed_bytes(ggml_type: str, shape: tuple[int, int]) -> int:
    """Bytes a matrix of this type and shape takes in memory as a QuantMatrix or
    DenseMatrix (a few bytes a block more than the file for Q3_K, Q4_K, Q5_K, IQ4_XS)."""
    n, k = shape
    if ggml_type in DENSE_TYPES:
        return n * k * DENSE_TYPES[ggml_type].itemsize
    layout = layout_of(ggml_type)
    kp, rows = layout.padded_k(k), -(-n // ROWS) * ROWS
    return rows * (kp // CHUNK * layout.code_bytes + kp // layout.group * layout.record_bytes)


class _Kernels:
    """pocketlm.kernels.cpp.gguf_ops(), kept where a compiled graph reads it as a constant
    (it cannot trace the lookup itself); each matrix notes at birth whether to use it."""

    ops = None


_kernels = _Kernels()


def _kernels_here() -> bool:
    """Whether pocketlm's GGUF kernels run here (they are then in `_kernels.ops`)."""
    ops = gguf_ops()
    if ops is not None:
        _kernels.ops = ops
    return ops is not None


class QuantMatrix(nn.Module):
    """An (N, K) matrix of one GGUF quantized type, in pocketlm's layout of it."""

    def __init__(
        self, layout: Layout, codes: torch.Tensor, records: torch.Tensor, *, shape: tuple[int, int]
    ) -> None:
        super().__init__()
        self.layout = layout
        self.out_features, self.in_features = shape
        self.register_buffer("codes", codes)  # (N/4, Kp/64, 4, code bytes) uint8
        self.register_buffer("records", records)  # (N/4, Kp/group, 4, record bytes) uint8
        self.register_buffer("table", layout.table_bytes())
        self.params = layout.params()  # as the C++ kernels take the layout
        self._fast = _kernels_here()  # a bool: the module stays copyable and picklable

    @classmethod
    def from_gguf(cls, raw: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> "QuantMatrix":
        """From the file's bytes of the matrix (any uint8 array, a memory map too)."""
        codes, records = repack(raw, ggml_type, shape)
        return cls(layout_of(ggml_type), codes, records, shape=shape)

    def dequantize(self, start: int = 0, stop: int | None = None, *, dtype=torch.float32):  # noqa: ANN001, ANN201
        """Rows [start, stop) as `dtype`: gguf's weights bit for bit (bf16: those rounded)."""
        stop = self.out_features if stop is None else stop
        return _dequantize_rows(
            self.layout, self.codes, self.records, self.table, k=self.in_features,
            rows=(start, stop), dtype=dtype, fast=self._fast,
        )  # fmt: skip

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) float32."""
        ops = _kernels.ops if self._fast and rows.device.type == "cpu" else None
        if ops is not None and len(rows) <= DECODE_MAX_ROWS:
            return ops.quant_gemv(
                rows, self.codes, self.records, self.table, self.params, self.out_features
            )
        return tiled_matmul(rows, self, exact=ops is None)

    def merge(self, other: nn.Module) -> "QuantMatrix | None":
        """This matrix with `other`'s rows below it, when both are of one layout and this
        one's rows fill whole blocks of four; else None."""
        if (
            not isinstance(other, QuantMatrix)
            or other.layout != self.layout
            or other.in_features != self.in_features
            or self.out_features % ROWS
        ):
            return None
        codes, records = (
            torch.cat([self.codes, other.codes]),
            torch.cat([self.records, other.records]),
        )
        shape = (self.out_features + other.out_features, self.in_features)
        return QuantMatrix(self.layout, codes, records, shape=shape)

    def extra_repr(self) -> str:
        return f"{self.layout.ggml_type}, in_features={self.in_features}, out_features={self.out_features}"


def _dequantize_rows(
    layout: Layout,
    codes: torch.Tensor,
    records: torch.Tensor,
    table: torch.Tensor | None,
    *,
    k: int,
    rows: tuple[int, int],
    dtype: torch.dtype,
    fast: bool,
) -> torch.Tensor:
    """Rows [start, stop) of a packed matrix as `dtype`: by the C++ kernel where it runs
    (`fast`, on a CPU), else by gguf_layouts.dequantize."""
    start, stop = rows
    ops = _kernels.ops if fast and codes.device.type == "cpu" else None
    if ops is not None and dtype in (torch.float32, torch.bfloat16):
        return ops.quant_dequant(
            codes, records, table, layout.params(), start, stop - start, k,
            dtype == torch.bfloat16,
        )  # fmt: skip
    return dequantize(layout, codes, records, k=k, rows=rows).to(dtype)


class DenseMatrix(nn.Module):
    """An (N, K) float matrix kept in its own dtype (bf16, f16 or f32)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self._fast = _kernels_here()  # a bool: the module stays copyable and picklable

    @classmethod
    def from_gguf(cls, raw: np.ndarray, ggml_type: str, shape: tuple[int, int]) -> "DenseMatrix":
        weight = torch.from_numpy(np.array(raw)).view(DENSE_TYPES[ggml_type])
        return cls(weight.reshape(shape))

    def dequantize(self, start: int = 0, stop: int | None = None, *, dtype=torch.float32):  # noqa: ANN001, ANN201
        return self.weight[start:stop].to(dtype)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) float32."""
        w = self.weight
        if w.dtype == torch.float32:
            return F.linear(rows.float(), w)
        ops = _kernels.ops if self._fast and rows.device.type == "cpu" else None
        if ops is not None and len(rows) <= DECODE_MAX_ROWS and self.in_features % 32 == 0:
            return ops.half_gemv(rows, w)
        if ops is not None and w.dtype == torch.bfloat16:  # the weight as it is
            return F.linear(rows.to(torch.bfloat16), w).float()
        return tiled_matmul(rows, self, exact=ops is None or rows.device.type != "cpu")

    def merge(self, other: nn.Module) -> "DenseMatrix | None":
        if not isinstance(other, DenseMatrix) or other.weight.dtype != self.weight.dtype:
            return None
        return DenseMatrix(torch.cat([self.weight, other.weight]))

    def extra_repr(self) -> str:
        return (
            f"{self.weight.dtype}, in_features={self.in_features}, out_features={self.out_features}"
        )


def tiled_matmul(rows: torch.Tensor, matrix: nn.Module, *, exact: bool) -> torch.Tensor:
    """rows (M, K) @ W.T, W dequantized a tile of rows at a time: in float32 (`exact`) or
    as bf16 matmuls. Never more than a tile of W in float."""
    n = matrix.out_features
    compute = torch.float32 if exact else torch.bfloat16
    x = rows.to(compute)
    y = torch.empty((len(rows), n), dtype=torch.float32, device=rows.device)
    step = max(ROWS, _TILE_WEIGHTS // matrix.in_features // ROWS * ROWS)
    for start in range(0, n, step):
        stop = min(start + step, n)
        y[:, start:stop] = F.linear(x, matrix.dequantize(start, stop, dtype=compute))
    return y


class GGUFLinear(nn.Module):
    """y = x @ W.T + bias, W one GGUF matrix or several side by side (a fused q/k/v), each
    kept in its stored type."""

    def __init__(self, parts: list[nn.Module], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len({part.in_features for part in parts}) != 1:
            raise PocketLMError("matrices fused into one GGUFLinear must share their input width")
        self.parts = nn.ModuleList(parts)
        self._parts = tuple(parts)  # the same modules, read faster than a ModuleList
        self.in_features = parts[0].in_features
        self.out_features = sum(part.out_features for part in parts)
        self.register_buffer("bias", bias)  # (N,) float32 or None

    @classmethod
    def from_gguf(
        cls,
        raw: np.ndarray,
        ggml_type: str,
        shape: tuple[int, int],
        bias: torch.Tensor | None = None,
    ) -> "GGUFLinear":
        """A matrix from its GGUF bytes (rows in nn.Linear orientation, (N, K))."""
        return cls([gguf_matrix(raw, ggml_type, shape)], bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        # The parts' forward called directly: a decode step makes ~100 of these calls,
        # and nn.Module's __call__ machinery costs microseconds each.
        if len(self._parts) == 1:
            y = self._parts[0].forward(rows)  # (M, N)
        else:
            y = torch.cat([part.forward(rows) for part in self._parts], dim=-1)
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole (N, K) weight in float: for tests and conversions, not for inference."""
        return torch.cat([part.dequantize(dtype=dtype) for part in self.parts])

    @classmethod
    def concat(cls, linears: list[nn.Module]) -> "GGUFLinear":
        """One GGUFLinear computing the given ones side by side (see models' concat_linears):
        parts of one layout merged into one matrix where they can be. A plain nn.Linear
        among them (a matrix an adapter changed, kept in float) joins as a DenseMatrix."""
        linears = [_as_gguf(lin) for lin in linears]
        parts: list[nn.Module] = []
        for part in (p for lin in linears for p in lin.parts):
            merged = parts[-1].merge(part) if parts else None
            if merged is None:
                parts.append(part)
            else:
                parts[-1] = merged
        biases = [lin.bias for lin in linears]
        if all(b is None for b in biases):
            return cls(parts)
        full = [
            torch.zeros(lin.out_features) if b is None else b
            for lin, b in zip(linears, biases, strict=True)
        ]
        return cls(parts, torch.cat(full))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


_LAYOUT_OF_PARAMS = {tuple(layout.params()): layout for layout in LAYOUTS.values()}


# An op of its own: which rows it dequantizes depends on the data, which a compiled graph
# (`--compile`) cannot trace; as an op it is one opaque call there, its shape declared.
@torch.library.custom_op("pocketlm::gguf_rows", mutates_args=())
def quant_rows(
    ids: torch.Tensor,
    codes: torch.Tensor,
    records: torch.Tensor,
    table: torch.Tensor | None,
    params: list[int],
    n: int,
    k: int,
) -> torch.Tensor:
    """Rows `ids` (M,) of a packed (n, k) matrix -> (M, k) float32, each distinct row
    dequantized once."""
    unique, where = ids.unique(return_inverse=True)
    if len(unique) and not 0 <= int(unique[0]) <= int(unique[-1]) < n:
        raise IndexError(f"token ids must lie in [0, {n})")
    layout, fast = _LAYOUT_OF_PARAMS[tuple(params)], _kernels.ops is not None
    rows = [
        _dequantize_rows(layout, codes, records, table, k=k, rows=(i, i + 1),
                         dtype=torch.float32, fast=fast)
        for i in unique.tolist()
    ]  # fmt: skip
    return (torch.cat(rows) if rows else torch.empty(0, k))[where]


@quant_rows.register_fake
def _(ids, codes, records, table, params, n, k):  # noqa: ANN001, ANN202 - the op's own
    return ids.new_empty((ids.shape[0], k), dtype=torch.float32)


def _as_gguf(linear: nn.Module) -> GGUFLinear:
    if isinstance(linear, GGUFLinear):
        return linear
    if type(linear) is not nn.Linear:
        raise PocketLMError(f"GGUFLinear cannot concatenate a {type(linear).__name__}")
    bias = None if linear.bias is None else linear.bias.detach()
    return GGUFLinear([DenseMatrix(linear.weight.detach())], bias)


class GGUFEmbedding(nn.Module):
    """Token embeddings looked up in a GGUF matrix (vocab, width) kept as stored: only the
    rows of the tokens asked for are dequantized (float32), each once per call."""

    def __init__(self, matrix: nn.Module) -> None:
        super().__init__()
        self.matrix = matrix  # QuantMatrix or DenseMatrix
        self.num_embeddings, self.embedding_dim = matrix.out_features, matrix.in_features

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(...) token ids -> (..., width) float32."""
        m = self.matrix
        if isinstance(m, DenseMatrix):
            return m.weight[tokens].float()
        rows = quant_rows(
            tokens.reshape(-1), m.codes, m.records, m.table, m.params, m.out_features, m.in_features
        )
        return rows.view(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.matrix.extra_repr()}"
