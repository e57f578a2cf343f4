"""GGUF matrices kept as stored (pocketlm.kernels.gguf): every quantized type, repacked into
pocketlm's layouts, against gguf-py's own dequantizer (the oracle), bit for bit; the C++
repack against the PyTorch one, byte for byte; the packed matmuls (C++ kernels and the
PyTorch fallback) against dequantize-then-matmul, within the tolerance each path's
activation precision implies; padding and refusals; fusing.

Blocks have realistic statistics: gguf-py's quantizer on Gaussian weights where it has
one (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), otherwise random codes with f16 scales of magnitude
1e-3..1e-2 and random sub-scales, written byte by byte in gguf's block layout.
No timings are asserted anywhere.
"""

import logging
import warnings

import gguf.quants
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

import pocketlm.kernels.gguf
import pocketlm.kernels.gguf_layouts
from pocketlm.errors import PocketLMError
from pocketlm.kernels import cpp
from pocketlm.kernels.gguf import DECODE_MAX_ROWS, GGUFLinear, QuantMatrix
from pocketlm.kernels.gguf_layouts import LAYOUTS, dequantize, repack

TYPES = list(LAYOUTS)  # Q4_0 Q4_1 IQ4_NL Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_XS MXFP4
QUANTIZABLE = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}  # gguf-py can quantize these
# Where each type's f16 scales sit in its block (byte offsets), for the hand-built ones.
F16_FIELDS = {
    "IQ4_NL": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "IQ4_XS": (0,),
    "MXFP4": (),  # an E8M0 byte instead, set below
}
# MXFP4 scales 2^(e - 128) that an f16 holds exactly: 2^-24 (subnormal) to 2^15.
MXFP4_EXACT = (104, 143)
ON_VNNI = cpp.gguf_ops() is not None


def gguf_blocks(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """The bytes of an (n, k) matrix of `kind`, as a GGUF file holds it: (n, row bytes)."""
    rng = np.random.default_rng(seed)
    if kind in QUANTIZABLE:
        weights = rng.normal(0, 0.02, size=(n, k)).astype(np.float32)
        return gguf.quants.quantize(weights, GGMLQuantizationType[kind])
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)  # codes, sub-scales
    for at in F16_FIELDS[kind]:
        scale = rng.uniform(1e-3, 1e-2, size=(n, k // block)).astype(np.float16)
        raw[..., at : at + 2] = scale.view(np.uint8).reshape(n, k // block, 2)
    if kind == "MXFP4":
        raw[..., 0] = rng.integers(MXFP4_EXACT[0], MXFP4_EXACT[1] + 1, size=(n, k // block))
    return raw.reshape(n, -1)


def oracle(kind: str, raw: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """gguf-py's dequantization of the bytes, float32 (n, k)."""
    return torch.from_numpy(gguf.quants.dequantize(raw, GGMLQuantizationType[kind]).reshape(shape))


def shapes(kind: str) -> list[tuple[int, int]]:
    """N not a multiple of 4 (padded rows); for 32-weight types, K of an odd number of
    32-blocks too (padded to 64); enough row blocks for both threads."""
    if LAYOUTS[kind].scheme == "b32":
        return [(37, 96), (101, 512)]
    return [(37, 256), (101, 512)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("kind", TYPES)
def test_repacked_weights_are_gguf_dequantizers_bit_for_bit(kind):
    """The layout keeps every weight: dequantized (PyTorch, and the C++ op the prefill
    uses, whole and by row ranges) it is gguf's float32 result to the bit, -0.0 included."""
    for n, k in shapes(kind):
        raw = gguf_blocks(kind, n, k)
        want = oracle(kind, raw, (n, k))
        matrix = QuantMatrix.from_gguf(raw, kind, (n, k))
        layout = LAYOUTS[kind]
        torch_rows = dequantize(layout, matrix.codes, matrix.records, k=k, rows=(0, n))
        assert torch.equal(bits(torch_rows), bits(want)), kind
        assert torch.equal(matrix.dequantize(5, 30), want[5:30])
        assert torch.equal(bits(matrix.dequantize()), bits(want))
        assert torch.equal(matrix.dequantize(dtype=torch.bfloat16), want.bfloat16())


@pytest.mark.skipif(not ON_VNNI, reason="pocketlm's GGUF kernels need AVX-512 VNNI")
@pytest.mark.parametrize("kind", TYPES)
def test_the_cpp_repack_is_the_pytorch_one_byte_for_byte(kind, monkeypatch):
    """gguf_repack (C++, what loading uses) builds the very codes and records PyTorch's
    repack does, padded rows and a padded odd 32-block included, from a read-only array
    (as a file's map is) without a warning."""
    odd = [(6, 224), (3, 32)] if LAYOUTS[kind].scheme == "b32" else [(3, 768)]
    for n, k in shapes(kind) + odd:
        raw = gguf_blocks(kind, n, k, seed=k)
        raw.flags.writeable = False
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = repack(raw, kind, (n, k))
        with monkeypatch.context() as patch:
            patch.setattr(pocketlm.kernels.gguf_layouts, "gguf_ops", lambda: None)
            want = repack(raw, kind, (n, k))
        assert [t.shape for t in got] == [t.shape for t in want]
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), (kind, n, k)


def test_the_layouts_stay_compact():
    """Bytes per weight in memory, padding aside: the file's, or a little more where the
    K types' 6-bit sub-scales are unpacked (Q4_K 4.5 -> 4.625 bits) and MXFP4's one-byte
    scale becomes an f16 (4.25 -> 4.5 bits)."""
    got = {}
    for kind in TYPES:
        raw = gguf_blocks(kind, 64, 1024)
        m = QuantMatrix.from_gguf(raw, kind, (64, 1024))
        got[kind] = (m.codes.numel() + m.records.numel()) / raw.size
    assert got["Q4_K"] == pytest.approx(148 / 144)
    assert got["Q3_K"] == pytest.approx(114 / 110)
    assert got.pop("MXFP4") == pytest.approx(18 / 17)
    assert all(ratio <= 1.04 for ratio in got.values()), got


def q8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x as the decode kernel quantizes it (per 32 values, step max|x|/127, rounded half to
    even): the values it multiplies, and each value's step."""
    m, k = x.shape
    blocks = x.view(m, k // 32, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(step != 0, 1 / step, torch.zeros_like(step))
    q = torch.round(blocks * inverse)
    return (q * step).view(m, k), step.expand(m, k // 32, 32).reshape(m, k)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("rows", [1, 4, 64])  # a decode step, a small batch, a prompt
@pytest.mark.parametrize("path", ["kernels", "pytorch"])
def test_packed_matmul_is_dequantize_then_matmul(kind, rows, path, monkeypatch):
    """Decode kernel (rows <= DECODE_MAX_ROWS): exactly dequantize(W) @ q8(x) up to fp32
    rounding, and so within sum |w| * step/2 of W @ x. Prefill: bf16 x and W, within
    2^-7 of sum |w x|. PyTorch fallback: W @ x in fp32."""
    if path == "kernels" and not ON_VNNI:
        pytest.skip("pocketlm's GGUF kernels need AVX-512 VNNI")
    if path == "pytorch":
        monkeypatch.setattr(pocketlm.kernels.gguf, "gguf_ops", lambda: None)
    torch.manual_seed(rows)
    for n, k in shapes(kind):
        raw = gguf_blocks(kind, n, k, seed=n)
        w = oracle(kind, raw, (n, k)).double()
        layer = GGUFLinear.from_gguf(raw, kind, (n, k))
        x = torch.randn(rows, k)
        y = layer(x).double()
        assert y.shape == (rows, n)
        exact = x.double() @ w.T
        size = x.double().abs() @ w.abs().T  # sum |x w| per output
        if path == "pytorch":
            assert ((y - exact).abs() <= 1e-5 * size).all()
        elif rows <= DECODE_MAX_ROWS:
            xq, step = q8_rows(x)
            assert ((y - xq.double() @ w.T).abs() <= 1e-5 * size).all()
            bound = (step.double() / 2) @ w.abs().T
            assert ((y - exact).abs() <= bound + 1e-5 * size).all()
        else:
            assert ((y - exact).abs() <= 2**-7 * size).all()


@pytest.mark.skipif(not ON_VNNI, reason="pocketlm's GGUF kernels need AVX-512 VNNI")
def test_each_row_of_a_batch_gets_what_it_would_alone():
    """Rows of x are quantized and summed on their own: a server's batch gives every
    request the numbers it would get alone, whatever rows share the call."""
    raw = gguf_blocks("Q4_K", 64, 512)
    layer = GGUFLinear.from_gguf(raw, "Q4_K", (64, 512))
    x = torch.randn(7, 512)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(7)])
    assert torch.equal(layer(x), alone)


def test_shapes_that_do_not_split_into_blocks_are_refused():
    raw = gguf_blocks("Q4_0", 4, 64)
    with pytest.raises(PocketLMError, match="do not hold"):
        QuantMatrix.from_gguf(raw, "Q4_0", (4, 48))
    with pytest.raises(PocketLMError, match="do not hold"):
        QuantMatrix.from_gguf(gguf_blocks("Q4_K", 4, 256), "Q4_K", (8, 256))
    with pytest.raises(PocketLMError, match="IQ2_XXS"):
        QuantMatrix.from_gguf(raw, "IQ2_XXS", (4, 64))


@pytest.mark.skipif(not ON_VNNI, reason="pocketlm's GGUF kernels need AVX-512 VNNI")
def test_the_kernels_refuse_an_x_of_another_width():
    layer = GGUFLinear.from_gguf(gguf_blocks("Q4_0", 8, 128), "Q4_0", (8, 128))
    with pytest.raises(RuntimeError, match="quant_gemv"):
        layer.parts[0](torch.randn(1, 64))


@pytest.mark.parametrize("kind", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_dense_matrices_stay_in_their_dtype(kind, rows):
    """BF16/F16 are multiplied as stored (decode: fp32 activations, so W @ x to fp32
    rounding; prefill: bf16), F32 in fp32."""
    torch.manual_seed(rows)
    w = torch.randn(37, 96) * 0.02
    raw = gguf.quants.quantize(w.numpy(), GGMLQuantizationType[kind]).view(np.uint8)
    layer = GGUFLinear.from_gguf(raw.reshape(37, -1), kind, (37, 96))
    stored = layer.parts[0].weight
    assert stored.dtype == pocketlm.kernels.gguf.DENSE_TYPES[kind]
    want = oracle(kind, raw, (37, 96)).double()
    assert torch.equal(stored.double(), want)
    x = torch.randn(rows, 96)
    y = layer(x).double()
    size = x.double().abs() @ want.abs().T
    fp32 = kind == "F32" or rows <= DECODE_MAX_ROWS or not ON_VNNI
    assert ((y - x.double() @ want.T).abs() <= (1e-5 if fp32 else 2**-7) * size).all()


def test_fused_layers_merge_parts_of_one_layout():
    """q and k of Q4_K merge into one matrix; a Q6_K v stays a part of its own; biases
    (some missing) line up; the output is the three layers' side by side."""
    torch.manual_seed(0)
    q = GGUFLinear.from_gguf(gguf_blocks("Q4_K", 64, 256, 1), "Q4_K", (64, 256), torch.randn(64))
    k = GGUFLinear.from_gguf(gguf_blocks("Q4_K", 30, 256, 2), "Q4_K", (30, 256))
    v = GGUFLinear.from_gguf(gguf_blocks("Q6_K", 30, 256, 3), "Q6_K", (30, 256), torch.randn(30))
    fused = GGUFLinear.concat([q, k, v])
    assert [type(p) for p in fused.parts] == [QuantMatrix, QuantMatrix]
    assert [p.out_features for p in fused.parts] == [94, 30]
    assert torch.equal(
        fused.dequantize(), torch.cat([q.dequantize(), k.dequantize(), v.dequantize()])
    )
    for rows in (1, 40):
        x = torch.randn(rows, 256)
        assert torch.equal(fused(x), torch.cat([q(x), k(x), v(x)], dim=-1))
    # k's 30 rows end inside a block of four: what follows cannot merge into it
    assert len(GGUFLinear.concat([k, k]).parts) == 2


@pytest.mark.skipif(not ON_VNNI, reason="pocketlm's GGUF kernels need AVX-512 VNNI")
def test_the_ops_have_fakes_for_torch_compile():
    ops = cpp.gguf_ops()
    m = QuantMatrix.from_gguf(gguf_blocks("IQ4_XS", 8, 256), "IQ4_XS", (8, 256))
    params = m.layout.params()
    checks = ("test_schema", "test_faketensor")
    args = (torch.randn(3, 256), m.codes, m.records, m.table, params, 8)
    torch.library.opcheck(ops.quant_gemv, args, test_utils=checks)
    args = (m.codes, m.records, m.table, params, 2, 5, 256, True)
    torch.library.opcheck(ops.quant_dequant, args, test_utils=checks)
    torch.library.opcheck(
        ops.half_gemv, (torch.randn(2, 64), torch.randn(8, 64).half()), test_utils=checks
    )


def test_without_the_kernels_it_says_so_once(monkeypatch, caplog):
    monkeypatch.setenv("POCKETLM_KERNELS", "0")
    cpp.gguf_ops.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="pocketlm"):
            assert cpp.gguf_ops() is None
            assert cpp.gguf_ops() is None
        said = [r.message for r in caplog.records if "GGUF matrices" in r.message]
        assert said == ["GGUF matrices use PyTorch (dequantize, then matmul): POCKETLM_KERNELS=0"]
    finally:
        cpp.gguf_ops.cache_clear()


def test_mxfp4_scales_beyond_an_f16_become_zero_or_are_refused():
    """gpt-oss's MXFP4: a block scaled below 2^-24 (e = 0 marks an all-zero block) holds
    zeros; one above 2^15 is refused in one line, not turned into infinities."""
    raw = gguf_blocks("MXFP4", 4, 64)
    raw.reshape(4, 2, 17)[0, 1, 0] = 0  # row 0, second block: below an f16
    got = QuantMatrix.from_gguf(raw, "MXFP4", (4, 64)).dequantize(0, 4)
    expected = oracle("MXFP4", raw, (4, 64))
    assert torch.equal(got[0, 32:], torch.zeros(32))
    assert expected[0, 32:].abs().max() < 2**-120  # what the zeros stand for
    assert torch.equal(bits(got[1:]), bits(expected[1:])) and torch.equal(
        got[0, :32], expected[0, :32]
    )
    raw.reshape(4, 2, 17)[2, 0, 0] = MXFP4_EXACT[1] + 1
    with pytest.raises(PocketLMError, match=r"MXFP4 block is scaled by 2\^16") as error:
        QuantMatrix.from_gguf(raw, "MXFP4", (4, 64))
    assert "\n" not in str(error.value)
