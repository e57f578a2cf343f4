"""Weight-only int4 on the CPU: 4-bit codes in groups of 32 weights, each group with a
scale and an offset, computed by PyTorch's int4 kernel (`_weight_int4pack_mm_for_cpu`).

A weight is w = (q - 8) * scale + zero, q in 0..15, one (scale, zero) per 32 weights of a
row: exactly the layout of the GGUF files the default model ships as (Q4_0: zero = 0;
Q4_1, w = d * q + m: scale = d, zero = m + 8 d), so those load with their own 4-bit codes,
never rounded again. A float checkpoint is quantized here (min/max per group). The
kernel reads a quarter of bf16's bytes and wants bf16 activations: its fp32 path is
two orders of magnitude slower, so rows are cast to bf16 and back, as for int8.

Dimension letters: N = out features, K = in features, G = groups (K / 32), M = rows.
Knows nothing of files or models beyond nn.Linear. (torchao `int4_weight_only`;
ggml `block_q4_0`, `block_q4_1`.)
"""

import numpy as np
import torch
from torch import nn

from pocketlm.errors import PocketLMError
from pocketlm.kernels.int8 import Int8Linear
from pocketlm.models.layers import replace_linears

GROUP = 32  # weights per scale: a GGUF Q4 block
Q4_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}  # f16 d (+ f16 m) and 16 bytes of nibbles


class Int4Linear(nn.Module):
    """y = x @ W.T + bias, W (N, K) stored as 4-bit codes with a bf16 scale and zero per
    group of 32."""

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        if codes.device.type != "cpu":
            raise PocketLMError("int4 runs on the CPU only; on a GPU use --quantize int8 or bf16")
        # Kept as plain codes until the first forward packs them for the kernel (a layout
        # that depends on the CPU's vector width), so layers can still be concatenated.
        self.register_buffer("codes", codes.to(torch.uint8))  # (N, K) 0..15
        self.register_buffer("packed", None)  # (N, K/2) uint8, the kernel's layout
        self.register_buffer("scales_zeros", None)  # (G, N, 2) bf16, the kernel's layout
        self.register_buffer("scales", scales.float())  # (N, G)
        self.register_buffer("zeros", zeros.float())  # (N, G)
        self.register_buffer("bias", bias)  # (N,) or None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int4Linear":
        """Asymmetric per-group quantization: a group's min and max are codes 0 and 15."""
        w = linear.weight.detach().float()
        n, k = w.shape
        groups = w.view(n, k // GROUP, GROUP)  # (N, G, 32)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (N, G)
        scales = ((high - low) / 15).clamp(min=1e-12)
        codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15)
        bias = None if linear.bias is None else linear.bias.detach().float()
        return cls(codes.to(torch.uint8).view(n, k), scales, low + 8 * scales, bias)

    @staticmethod
    def fits(out_features: int, in_features: int) -> bool:
        """Whether the kernel takes this shape (rows in 32-weight groups, N in 16s)."""
        return in_features % GROUP == 0 and out_features % 16 == 0

    @classmethod
    def concat(cls, linears: list["Int4Linear"]) -> "Int4Linear":
        """One Int4Linear computing the given ones side by side (see models' concat_linears)."""
        if any(lin.codes is None for lin in linears):
            raise ValueError("int4 layers are concatenated before their first forward")
        biases = [lin.bias for lin in linears]
        return cls(
            *(
                torch.cat([getattr(lin, part) for lin in linears])
                for part in ("codes", "scales", "zeros")
            ),
            None if biases[0] is None else torch.cat(biases),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            self.pack()
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        # One kernel for every row count: at 512 rows it is within 2x of a bf16 matmul,
        # which would first need the weight dequantized.
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def pack(self) -> None:
        """Codes -> the kernel's packed layout; scales and zeros -> its (G, N, 2) bf16 pairs."""
        if self.packed is not None:
            return
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes.int(), 1)
        pairs = torch.stack([self.scales, self.zeros], dim=-1)  # (N, G, 2)
        self.scales_zeros = pairs.transpose(0, 1).contiguous().bfloat16()  # (G, N, 2)
        self.codes = self.scales = self.zeros = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{GROUP}"


def q4_to_int4(
    raw: np.ndarray, kind: str, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_0 / Q4_1 bytes of an (N, K) matrix -> codes (N, K) uint8, scales and zeros
    (N, G) float32, with w = (q - 8) * scale + zero equal to the file's weights."""
    n, k = shape
    if k % GROUP:
        raise PocketLMError(
            f"a {kind} tensor of shape {shape} does not split into 32-weight blocks"
        )
    blocks = torch.from_numpy(np.array(raw)).view(n, k // GROUP, Q4_BLOCK_BYTES[kind])
    d = blocks[..., :2].contiguous().view(torch.float16).float()[..., 0]  # (N, G)
    if kind == "Q4_0":  # w = d * (q - 8)
        zeros, qs = torch.zeros_like(d), blocks[..., 2:]
    else:  # w = d * q + m = d * (q - 8) + (m + 8 d)
        m = blocks[..., 2:4].contiguous().view(torch.float16).float()[..., 0]
        zeros, qs = m + 8 * d, blocks[..., 4:]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # (N, G, 32): low nibbles first
    return codes.reshape(n, k), d, zeros


def quantize_int4(model: nn.Module) -> nn.Module:
    """Replace the nn.Linear layers of `model` by Int4Linear, in place; the head (the
    largest single source of logit error) and any matrix the kernel cannot take get int8."""

    def quantized(name: str, linear: nn.Linear) -> nn.Module:
        four_bit = name != "lm_head" and Int4Linear.fits(linear.out_features, linear.in_features)
        return (Int4Linear if four_bit else Int8Linear).from_float(linear)

    return replace_linears(model, quantized)
