"""pocketlm's own CPU kernels (pocketlm.kernels.cpp) against PyTorch's: the int8 matmul of a
decode step against `torch._weight_int8pack_mm` on the same weights and a float64 oracle,
its packed layout against the plain one, int8 models with it against the same models
without it (eager and compiled), and the fallback where it cannot be built.
No timings are asserted anywhere."""

import logging

import pytest
import torch

import pocketlm
import pocketlm.kernels.int8
import vendor
from checkpoints import make_gpt2, make_llama
from pocketlm.generate.sequence import Sequence
from pocketlm.kernels import cpp as kernels
from pocketlm.kernels.cpp import int8_gemv, pack_int8, unpack_int8
from pocketlm.kernels.int8 import Int8Linear, quantize_per_channel

ON_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
PROMPT = [464, 3290, 373, 1043]  # "The dog was found"


def test_the_int8_kernel_is_there_exactly_on_avx512_cpus():
    """Built (or found built) on an AVX-512 CPU, refused elsewhere; never a silent None
    on a CPU that should have it."""
    if ON_AVX512:
        assert int8_gemv() is not None
    else:
        assert int8_gemv() is None


@pytest.fixture(scope="module")
def gemv():
    if not ON_AVX512:
        pytest.skip("pocketlm's int8 kernel is AVX-512 only; this CPU uses PyTorch's")
    return int8_gemv()


@pytest.mark.parametrize("n, k", [(1, 64), (5, 64), (7, 128), (101, 576), (2304, 768)])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 32])  # 4 rows share each widened weight
def test_int8_gemv_equals_pytorchs_int8_kernel(gemv, n, k, rows):
    """Every N (padded blocks of four rows), widths of whole cache lines, up to the 32 rows
    the kernel is used for: equal to PyTorch's int8 kernel in fp32 and to float64."""
    torch.manual_seed(n + k + rows)
    weight, scales = quantize_per_channel(torch.randn(n, k))
    x = torch.randn(rows, k)
    got = gemv(x, pack_int8(weight), scales, n)
    pytorch = torch._weight_int8pack_mm(x, weight, scales)
    oracle = x.double() @ (weight.double() * scales.double()[:, None]).T
    assert got.shape == (rows, n) and got.dtype == torch.float32
    # fp32 sums in another order: a few ulps of the largest outputs
    scale = float(oracle.abs().max())
    torch.testing.assert_close(got, pytorch, rtol=0, atol=1e-5 * scale)
    assert (got.double() - oracle).abs().max() < 1e-5 * scale
    # each row's sums run in the same order whatever rows share the call: a server's batch
    # gives every request the numbers it would get alone
    alone = torch.cat([gemv(x[i : i + 1], pack_int8(weight), scales, n) for i in range(rows)])
    assert torch.equal(got, alone)
    # bf16 activations are widened to fp32, nothing else changes
    torch.testing.assert_close(
        gemv(x.bfloat16(), pack_int8(weight), scales, n),
        gemv(x.bfloat16().float(), pack_int8(weight), scales, n),
    )


@pytest.mark.parametrize("n", [4, 6, 101])
def test_packing_keeps_every_weight(n):
    weight = torch.randint(-127, 128, (n, 128), dtype=torch.int8)
    packed = pack_int8(weight)
    assert packed.shape == (-(-n // 4), 2, 4, 64)
    assert torch.equal(unpack_int8(packed, n), weight)
    assert torch.count_nonzero(packed).item() == torch.count_nonzero(weight).item()  # zero padding


@pytest.mark.parametrize("rows", [1, 3, 40])  # decode, a verify, a prefill (unpacked, bf16)
def test_packed_int8_linear_matches_a_float64_oracle(gemv, rows):
    torch.manual_seed(1)
    linear = torch.nn.Linear(128, 70)
    layer = Int8Linear.from_float(linear)
    weight = layer.weight.clone()
    layer.pack()
    assert layer.packed is not None and layer.weight is None
    assert torch.equal(layer.unpacked(), weight)
    x = torch.randn(2, rows, 128)
    want = x.double() @ (weight.double() * layer.scales.double()[:, None]).T + linear.bias.double()
    got = layer(x)
    assert got.shape == (2, rows, 70) and got.dtype == torch.float32
    # fp32 activations through the kernel; the prefill's bf16 path rounds to 2^-9
    bound = 1e-5 if rows <= 32 else 2**-7
    assert (got.double() - want).abs().max() < bound * want.abs().max()


def plain_int8(monkeypatch):
    """Load int8 models with PyTorch's kernel, as on a CPU without pocketlm's."""
    monkeypatch.setattr(pocketlm.kernels.int8, "int8_gemv", lambda: None)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_int8_model_with_the_kernel_gives_the_logits_without_it(gemv, arch, tmp_path, monkeypatch):
    """The tiny Llama's down_proj (K = 160) is no whole number of cache lines: it stays
    on PyTorch's kernel beside packed layers, in one model."""
    folder = (make_gpt2 if arch == "gpt2" else make_llama)(tmp_path / arch)
    fast = pocketlm.load(folder, device="cpu", quantize="int8")
    layers = [m for m in fast.model.modules() if isinstance(m, Int8Linear)]
    packed = [m for m in layers if m.packed is not None]
    assert packed and all(m.in_features % 64 == 0 for m in packed)
    assert (arch == "llama") == any(m.packed is None for m in layers)
    with monkeypatch.context() as patch:
        plain_int8(patch)
        plain = pocketlm.load(folder, device="cpu", quantize="int8")
    assert all(m.packed is None for m in plain.model.modules() if isinstance(m, Int8Linear))
    seq_fast, seq_plain = Sequence(fast.model), Sequence(plain.model)
    with torch.inference_mode():
        # a prefill (its head reads one row: the kernels), then decode steps; pocketlm's
        # kernel takes fp32 activations, PyTorch's bf16 ones (2^-9 roundings)
        pairs = [(seq_fast.prefill(PROMPT * 5), seq_plain.prefill(PROMPT * 5))]
        pairs += [(seq_fast.step(t), seq_plain.step(t)) for t in PROMPT]
    for a, b in pairs:
        assert float((a - b).norm() / b.norm()) < 1e-2


def test_compiled_int8_decode_gives_the_eager_tokens(gemv, tmp_path, pocketlm_home):
    """The kernel is an op of its own inside the compiled step (register_fake), so
    compiled int8 decoding computes the matmuls exactly as eager does. `lm.compile()`
    compiles at once, so no answer (and no --stats speed) pays for it; every later stream
    (each in a session of its own) decodes through the same compiled step, kept in the
    (private) pocketlm home."""
    folder = make_gpt2(tmp_path / "gpt2")
    eager = pocketlm.load(folder, device="cpu", quantize="int8")
    compiled = pocketlm.load(folder, device="cpu", quantize="int8")
    vendor.keep_compiled_kernels(pocketlm_home / "compiled")
    compiled.compile()
    warm = compiled.decode_step.calls
    assert warm >= 3
    a = eager.generate(PROMPT, max_tokens=24, temperature=0)
    for _ in range(2):
        b = compiled.generate(PROMPT, max_tokens=24, temperature=0)
        assert b.tokens == a.tokens
    assert compiled.decode_step.calls >= warm + 2 * 22  # every step after each prompt
    assert list((pocketlm_home / "compiled").glob("torch-*/decode-gpt2-*.pt2"))


@pytest.mark.parametrize(
    "error, reason",
    [
        ("Ninja is required to load C++ extensions\n(details)", "Ninja is required"),
        ("Error building extension 'pocketlm_kernels': [1/2] c++ -MMD ...", "C++ compiler failed"),
    ],
)
def test_a_kernel_that_does_not_build_falls_back_in_one_line(monkeypatch, caplog, error, reason):
    def failing_build(**kwargs):
        raise RuntimeError(error)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", failing_build)
    said = kernels.build()
    assert reason in said and "\n" not in said
    monkeypatch.setattr(kernels, "build", lambda: said)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    kernels.int8_gemv.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="pocketlm"):
            assert kernels.int8_gemv() is None
        assert f"pocketlm's did not build ({said}" in caplog.text
        # and a layer then keeps its plain weight for PyTorch's kernel
        layer = Int8Linear.from_float(torch.nn.Linear(64, 8))
        layer.pack()
        assert layer.packed is None and layer.weight is not None
    finally:
        kernels.int8_gemv.cache_clear()
