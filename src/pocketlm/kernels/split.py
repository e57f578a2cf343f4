"""fp32 matmuls for decoding on a CPU: each weight split into one block of output columns
per thread, so a one-row product uses every core.

A decode step multiplies one row by every weight matrix. On a CPU that is a
matrix-vector product, which PyTorch's BLAS runs on a single thread: GPT-2 small's
matrices alone ran at 45 tok/s on 2 cores (23 GB/s). Stored as P blocks (P, K, N/P), each
laid out for a row times a (K, N/P) matrix, the same product is one `torch.bmm` over
the blocks, which PyTorch spreads across its threads: 68 tok/s (34 GB/s). bf16 and int8
weights have kernels that already use every thread, so they keep their own layers; bf16
ones are made row-major (N, K), which that kernel reads faster (GPT-2 small bf16 decode
71 -> 90 tok/s: its Conv1D weights arrive transposed).

P = blocks (threads), K = in features, N = out features, M = rows.
Knows nothing of models beyond nn.Linear. (llama.cpp splits the rows of every matmul
between its threads the same way.)
"""

import torch
from torch import nn

from pocketlm.models.layers import replace_linears


@torch.library.custom_op("pocketlm::split_matmul", mutates_args=())
def split_matmul(rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """rows (M, K) times each block (P, K, N/P) -> (P, M, N/P), as one bmm. An op of its
    own so that torch.compile calls it as it is: inductor would otherwise turn a one-row
    bmm into loops of its own making (GPT-2 small fp32 compiled: 37 tok/s, not 64)."""
    return torch.bmm(rows.expand(blocks.shape[0], *rows.shape), blocks)


@split_matmul.register_fake
def _(rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    return rows.new_empty((blocks.shape[0], rows.shape[0], blocks.shape[2]))


class SplitLinear(nn.Module):
    """y = x @ weight.T + bias, the weight (N, K) kept as P column blocks (P, K, ceil(N/P))."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, blocks: int) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        width = -(-self.out_features // blocks)  # output columns per block (the last padded)
        split = weight.new_zeros((blocks, self.in_features, width))  # (P, K, N/P)
        for b, rows in enumerate(weight.detach().split(width)):
            split[b, :, : len(rows)] = rows.t()
        self.register_buffer("blocks", split)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, blocks: int) -> "SplitLinear":
        return cls(linear.weight, linear.bias, blocks=blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        y = split_matmul(rows, self.blocks)  # (P, M, N/P)
        y = y.transpose(0, 1).reshape(len(rows), -1)[:, : self.out_features]  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"blocks={self.blocks.shape[0]}"
        )


def split_linears(model: nn.Module, *, blocks: int | None = None) -> nn.Module:
    """Replace every fp32 CPU nn.Linear in `model` by a SplitLinear, in place (`blocks`:
    default, PyTorch's thread count), and make other CPU ones row-major. A head tied to the embedding gets its own blocks;
    the embedding keeps the original (memory-mapped, so only the rows looked up are read)."""
    blocks = blocks or torch.get_num_threads()

    def relaid(name: str, linear: nn.Linear) -> nn.Module | None:
        if linear.weight.device.type != "cpu":
            return None
        if linear.weight.dtype == torch.float32:
            return SplitLinear.from_linear(linear, blocks=blocks)
        if not linear.weight.is_contiguous():
            linear.weight = nn.Parameter(linear.weight.detach().contiguous(), requires_grad=False)
        return None

    return replace_linears(model, relaid)
