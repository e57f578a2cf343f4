"""Weight-only int8: `Int8Linear`, and GGUF Q8_0 codes turned into its layout.

`Int8Linear` keeps an nn.Linear's weight as int8 with one float scale per output channel
(symmetric, absmax / 127) and computes in floating point: a decode step (a few rows)
reads the int8 weight directly (a quarter of fp32's bytes, and decoding is bound by those
bytes), through pocketlm's own kernel where it builds (pocketlm.kernels.cpp: the weight kept
in the order it reads it, ~1.7x the speed of PyTorch's on GPT-2 small's matrices) and
through `torch.ops.aten._weight_int8pack_mm` elsewhere; a prefill (many rows)
dequantizes to bf16 once and uses the bf16 matmul (AMX on recent x86), which is faster
than the int8 kernel once the weight read is shared by many rows.

GGUF files quantized as Q8_0 load straight into `Int8Linear`: each row's 32-weight
blocks (int8 + an f16 scale) are rescaled to one scale per row a chunk of rows at a time,
so the whole tensor never exists in float. Other GGUF types and HF checkpoints are loaded
in fp32 and quantized here.

Knows nothing of files, tokenizers, sampling or the command line.
(gpt-fast `quantize.py` WeightOnlyInt8QuantHandler; ggml `block_q8_0`.)
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.errors import PocketLMError
from pocketlm.kernels.cpp import int8_gemv, int8_gemv_fits, pack_int8, unpack_int8
from pocketlm.models.layers import replace_linears

# Up to this many rows (decode, a server batch, a speculative verify, a short prompt) the
# int8 kernels beat dequantize-once + the bf16 matmul; beyond it they lose. GPT-2 small's
# matrices at 32 rows: pocketlm's 15 ms, PyTorch's 19, bf16 18-33 (it varies run to run).
_INT8_KERNEL_MAX_ROWS = 32
_ROW_CHUNK = 4096  # rows rescaled at a time when converting Q8_0


class Int8Linear(nn.Module):
    """y = x @ (weight_int8 * scales[:, None]).T + bias, the weight stored as int8."""

    def __init__(
        self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())  # (N, K) int8, until packed
        self.register_buffer("packed", None)  # (N/4, K/64, 4, 64) int8, pocketlm's kernel
        self.register_buffer("scales", scales.contiguous())  # (N,) float
        self.register_buffer("bias", bias)  # (N,) or None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        weight, scales = quantize_per_channel(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().float()
        return cls(weight, scales, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        few = rows.shape[0] <= _INT8_KERNEL_MAX_ROWS
        if few and self.packed is not None:  # pocketlm's kernel, fp32 activations
            # (looked up here, not kept on the module: a compiled step saved to disk
            # pickles the module's attributes, and an op cannot be pickled)
            gemv = torch.ops.pocketlm_kernels.int8_gemv
            y = gemv(rows, self.packed, self.scales, self.out_features)
        elif few and rows.device.type == "cpu":
            # PyTorch's kernel wants bf16 activations (fp32 ones take a slow loop).
            y = torch.ops.aten._weight_int8pack_mm(
                rows.to(torch.bfloat16), self.unpacked(), self.scales_bf16
            )
        else:
            compute = torch.bfloat16 if rows.device.type == "cpu" else x.dtype
            y = F.linear(rows.to(compute), self.unpacked().to(compute)).float() * self.scales
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def pack(self) -> None:
        """On a CPU where pocketlm's int8 kernel builds, keep the weight in the order that
        kernel reads it (pocketlm.kernels.cpp); elsewhere leave it as it is."""
        if self.packed is not None or self.weight.device.type != "cpu":
            return
        if not int8_gemv_fits(self.in_features) or int8_gemv() is None:
            return  # (packed: the kernel, torch.ops.pocketlm_kernels.int8_gemv, is loaded)
        self.packed, self.weight = pack_int8(self.weight), None

    def unpacked(self) -> torch.Tensor:
        """The (N, K) int8 weight, packed or not."""
        if self.packed is None:
            return self.weight
        return unpack_int8(self.packed, self.out_features)

    @classmethod
    def concat(cls, linears: list["Int8Linear"]) -> "Int8Linear":
        """One Int8Linear computing the given ones side by side (see models' concat_linears)."""
        biases = [lin.bias for lin in linears]
        bias = None if biases[0] is None else torch.cat(biases)
        return cls(
            torch.cat([lin.unpacked() for lin in linears]),
            torch.cat([lin.scales for lin in linears]),
            bias,
        )

    @property
    def scales_bf16(self) -> torch.Tensor:
        if (
            getattr(self, "_scales_bf16", None) is None
            or self._scales_bf16.device != self.scales.device
        ):
            self._scales_bf16 = self.scales.to(torch.bfloat16)
        return self._scales_bf16

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 (N, K) and scales (N,) float32, symmetric absmax per row."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def q8_0_to_int8(raw: np.ndarray, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q8_0 bytes of an (N, K) matrix -> int8 (N, K) and per-row scales (N,).

    A Q8_0 block is an f16 scale d then 32 int8 q (weight = d * q). The row scale is the
    row's largest |d| * max|q| / 127; blocks at that scale keep their integers exactly and
    the others are rounded onto the row's grid, chunk by chunk of rows."""
    n, k = shape
    if k % 32:
        raise PocketLMError(f"a Q8_0 tensor of shape {shape} does not split into 32-weight blocks")
    blocks = np.asarray(raw).reshape(n, k // 32, 34)
    weight = torch.empty((n, k), dtype=torch.int8)
    scales = torch.empty(n, dtype=torch.float32)
    for start in range(0, n, _ROW_CHUNK):
        chunk = torch.from_numpy(np.array(blocks[start : start + _ROW_CHUNK]))  # (R, B, 34) uint8
        d = chunk[..., :2].contiguous().view(torch.float16).float()  # (R, B, 1)
        q = chunk[..., 2:].contiguous().view(torch.int8)  # (R, B, 32)
        amax = (q.abs().amax(dim=-1, keepdim=True).float() * d.abs()).amax(dim=1)  # (R, 1)
        row_scale = amax.clamp(min=1e-12) / 127.0
        ratio = d / row_scale[:, None]  # (R, B, 1): 1.0 for the blocks that set the scale
        requant = torch.round(q.float() * ratio).clamp(-127, 127).to(torch.int8)
        weight[start : start + len(chunk)] = requant.view(len(chunk), k)
        scales[start : start + len(chunk)] = row_scale[:, 0]
    return weight, scales


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear in `model` by an Int8Linear, in place. A head tied to the
    embedding gets its own int8 copy; the embedding stays float (a lookup reads one row)."""
    return replace_linears(model, lambda name, linear: Int8Linear.from_float(linear))
