"""pocketlm's own CPU kernels, in C++ beside this file, compiled on first use.

One extension, `pocketlm_kernels`, of two sources:
- int8_gemv.cpp: `int8_gemv`, the matmul of a decode step with int8 weights, which
  streamed GPT-2 small's weights at ~50 GB/s where PyTorch's kernel reached ~30;
- gguf_gemv.cpp: `quant_gemv` (a decode step on GGUF-quantized weights in the layouts of
  gguf_layouts.py, activations in int8 per 32 for AVX-512 VNNI), `quant_dequant` (rows of
  such a matrix to fp32/bf16, a prefill's tiles), `gguf_repack` (a GGUF matrix's blocks
  into those layouts, at load) and `half_gemv` (bf16/f16 weights).
It is built with torch.utils.cpp_extension (a C++ compiler and ninja) the first time a
model that uses it is prepared on an AVX-512 CPU, about twenty seconds, then loaded from
the build folder (under PyTorch's extension cache, or TORCH_EXTENSIONS_DIR). Wherever it
cannot be had -- another CPU, no compiler, `POCKETLM_KERNELS=0` -- the callers use
PyTorch and say so once.

Knows nothing of models or files. (llama.cpp's ggml-cpu kernels do the same job by hand.)
"""

import functools
import logging
import os
import subprocess
from pathlib import Path

import torch

log = logging.getLogger("pocketlm")

_SOURCES = [Path(__file__).with_name(name) for name in ("int8_gemv.cpp", "gguf_gemv.cpp")]
_LIBRARY = "pocketlm_kernels"


@functools.cache
def int8_gemv():  # noqa: ANN201 (an OpOverloadPacket)
    """The `pocketlm_kernels::int8_gemv(x, packed, scale, n)` op, or None where it cannot
    be had here (said once, in the log)."""
    if os.environ.get("POCKETLM_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        log.info("int8 decoding uses PyTorch's kernel: pocketlm's needs an AVX-512 CPU")
        return None
    if (reason := build()) is not None:
        log.warning(
            "int8 decoding uses PyTorch's kernel: pocketlm's did not build (%s; "
            "POCKETLM_KERNELS=0 skips trying)",
            reason,
        )
        return None
    _register_fakes()
    return torch.ops.pocketlm_kernels.int8_gemv


@functools.cache
def gguf_ops():  # noqa: ANN201 (the torch.ops namespace)
    """`torch.ops.pocketlm_kernels`, whose quant_gemv, quant_dequant, gguf_repack and
    half_gemv serve GGUF weights, or None where they cannot be had here. Which path runs
    is said once."""
    plain = "GGUF matrices use PyTorch (dequantize, then matmul)"
    if os.environ.get("POCKETLM_KERNELS", "1") == "0":
        log.info("%s: POCKETLM_KERNELS=0", plain)
        return None
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        log.info("%s: pocketlm's kernels need an AVX-512 CPU", plain)
        return None
    if (reason := build()) is not None:
        log.warning("%s: pocketlm's kernels did not build (%s)", plain, reason)
        return None
    if not torch.ops.pocketlm_kernels.quant_kernels_supported():
        log.info("%s: pocketlm's kernels need AVX-512 VNNI", plain)
        return None
    _register_fakes()
    log.info("GGUF matrices use pocketlm's AVX-512 VNNI kernels (int8 activations per 32)")
    return torch.ops.pocketlm_kernels


@functools.cache
def _register_fakes() -> None:
    """Shapes of the kernels' results, for torch.compile (which then calls them as they are)."""

    @torch.library.register_fake("pocketlm_kernels::int8_gemv")
    def _(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], n), dtype=torch.float32)

    @torch.library.register_fake("pocketlm_kernels::quant_gemv")
    def _(x, codes, records, table, layout, n):  # noqa: ANN001, ANN202 (the op's schema)
        return x.new_empty((x.shape[0], n), dtype=torch.float32)

    @torch.library.register_fake("pocketlm_kernels::quant_dequant")
    def _(codes, records, table, layout, row0, rows, k, bf16):  # noqa: ANN001, ANN202
        return codes.new_empty((rows, k), dtype=torch.bfloat16 if bf16 else torch.float32)

    @torch.library.register_fake("pocketlm_kernels::half_gemv")
    def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


def build() -> str | None:
    """Compile the kernels (or find them compiled) and load them into PyTorch; None, or
    why not in one line."""
    quiet = logging.getLogger("torch.utils.cpp_extension")  # its compiler lecture, if any
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import get_default_build_root, load  # needs setuptools

        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
        folder = Path(root, f"pocketlm-torch-{torch.__version__}")
        if not (folder / f"{_LIBRARY}.so").exists():
            log.info("building pocketlm's kernels (once, about twenty seconds)")
        folder.mkdir(parents=True, exist_ok=True)
        load(
            name=_LIBRARY,
            sources=[str(source) for source in _SOURCES],
            # -fopenmp: without it at::parallel_for runs the kernel on one thread;
            # -ffp-contract=off: quant_dequant rounds as gguf does, never a fused a * b + c
            extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-fopenmp", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            is_python_module=False,
        )
    except (ImportError, OSError, RuntimeError, subprocess.CalledProcessError) as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        if lines[0].startswith("Error building extension"):
            return "the C++ compiler failed on it; it needs g++ with OpenMP"
        return lines[0]
    finally:
        quiet.setLevel(level)
    return None


def pack_int8(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 -> (ceil(N/4), K/64, 4, 64), the order int8_gemv reads it in (padded
    with zero rows)."""
    n, k = weight.shape
    rows = -(-n // 4) * 4
    padded = torch.cat([weight, weight.new_zeros(rows - n, k)]) if rows > n else weight
    return padded.view(rows // 4, 4, k // 64, 64).transpose(1, 2).contiguous()


def unpack_int8(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `pack_int8`: (N/4, K/64, 4, 64) -> (n, K)."""
    blocks, chunks = packed.shape[:2]
    return packed.transpose(1, 2).reshape(blocks * 4, chunks * 64)[:n]


def int8_gemv_fits(in_features: int) -> bool:
    """Whether int8_gemv takes a weight of this width (rows in whole cache lines)."""
    return in_features % 64 == 0
