"""Per-matrix times of GGUF matrices kept as stored (pocketlm.kernels.gguf), beside the
other ways pocketlm can multiply the same shape, in one run on one machine.

For each shape (SmolLM2-135M's fused q/k/v, o, gate/up and down; a 7B's 4096x4096,
14336x4096 and 4096x14336), GGUF type and row count, round-robin over the cases:
  - pocketlm:  GGUFLinear, the packed weights (decode kernel up to DECODE_MAX_ROWS rows,
               else bf16 tiles);
  - pytorch:   the same layer without pocketlm's kernels (dequantize tiles to fp32, fp32
               matmul: the portable fallback);
  - int8:      Int8Linear through pocketlm's int8_gemv (decode rows only), random codes;
  - int4:      Int4Linear through PyTorch's int4 kernel, random codes;
  - bf16:      F.linear on a bf16 weight.
Each case cycles through enough copies of its weights that they never sit in the 32 MB L3
(a decode reads every matrix once per token from memory). Times are the best round's
mean per matrix; GB/s counts the bytes the case's own weights take. The machine's read
bandwidth (best of 8 sums of 512 MB) is measured at the start for scale.

    python benchmarks/gguf_kernels.py                                # 1 and 4 rows, 4 types
    python benchmarks/gguf_kernels.py --rows 1,32,128 --types all --shapes 7b --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import gguf.quants
import numpy as np
import torch
import torch.nn.functional as F
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import pocketlm.kernels.gguf as gguf_kernels  # noqa: E402
from pocketlm.generate.benchmark import memory_bandwidth  # noqa: E402
from pocketlm.kernels.gguf import GGUFLinear  # noqa: E402
from pocketlm.kernels.gguf_layouts import LAYOUTS  # noqa: E402
from pocketlm.kernels.int4 import Int4Linear  # noqa: E402
from pocketlm.kernels.int8 import Int8Linear  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {
    "smollm2": [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)],
    "7b": [("q/o", 4096, 4096), ("gate", 14336, 4096), ("down", 4096, 14336)],
}
COLD_BYTES = 160e6  # copies of a case's weights cycled through: five times the 32 MB L3
F16_AT = {"IQ4_NL": (0,), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2)}
F16_AT |= {"Q6_K": (208,), "IQ4_XS": (0,)}


def gguf_bytes(kind: str, n: int, k: int) -> np.ndarray:
    """Random (n, k) blocks of `kind`, as tests/test_gguf_kernels.py makes them."""
    rng = np.random.default_rng(0)
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        w = rng.normal(0, 0.02, size=(n, k)).astype(np.float32)
        return gguf.quants.quantize(w, GGMLQuantizationType[kind])
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    for at in F16_AT[kind]:
        scale = rng.uniform(1e-3, 1e-2, size=(n, k // block)).astype(np.float16)
        raw[..., at : at + 2] = scale.view(np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


def nbytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers() if b is not None) + sum(
        p.numel() * p.element_size() for p in module.parameters()
    )


def copies_of(one, size: int) -> list:  # noqa: ANN001 (a module or a tensor)
    """`one` and deep copies of it, COLD_BYTES in all."""
    return [one] + [copy.deepcopy(one) for _ in range(max(1, int(COLD_BYTES // size) - 1))]


def cases_for(n: int, k: int, kind: str, rows: int) -> dict[str, tuple[list, int]]:
    """name -> (calls, one per copy of the weights; bytes of one copy)."""
    x = torch.randn(rows, k)
    raw = gguf_bytes(kind, n, k)
    layer = GGUFLinear.from_gguf(raw, kind, (n, k))
    size = nbytes(layer)
    layers = copies_of(layer, size)
    cases = {"pocketlm": ([lambda m=m: m(x) for m in layers], size)}
    cases["pytorch"] = ([lambda: _without_kernels(layer, x)], size)
    linear = torch.nn.Linear(k, n, bias=False)
    if rows <= gguf_kernels.DECODE_MAX_ROWS:
        int8 = copies_of(_packed(Int8Linear.from_float(linear)), n * k)
        cases["int8"] = ([lambda m=m: m(x) for m in int8], n * k)
    if Int4Linear.fits(n, k):
        int4 = copies_of(_packed(Int4Linear.from_float(linear)), n * k // 2)
        cases["int4"] = ([lambda m=m: m(x) for m in int4], nbytes(int4[0]))
    bf16 = copies_of(linear.weight.detach().bfloat16(), 2 * n * k)
    xb = x.bfloat16()
    cases["bf16"] = ([lambda w=w: F.linear(xb, w) for w in bf16], 2 * n * k)
    return cases


def _packed(module: torch.nn.Module) -> torch.nn.Module:
    module.pack()
    return module


def _without_kernels(layer: GGUFLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer as it runs where pocketlm's kernels cannot be had (each part notes at
    birth whether they can; here they are told not)."""
    fast = [part._fast for part in layer.parts]
    for part in layer.parts:
        part._fast = False
    try:
        return layer(x)
    finally:
        for part, was in zip(layer.parts, fast, strict=True):
            part._fast = was


def best_seconds(calls: list, rounds: int) -> float:
    """Seconds per call: the best of `rounds` passes over every copy (after one warm pass)."""
    for call in calls[:2]:
        call()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for call in calls:
            call()
        best = min(best, (time.perf_counter() - started) / len(calls))
    return best


def read_bandwidth() -> float:
    return memory_bandwidth(megabytes=512, repeats=8)


def measure(args: argparse.Namespace) -> list[dict]:
    rows_out = []
    for shape_set in args.shapes.split(","):
        for name, n, k in SHAPES[shape_set]:
            for kind in args.types:
                if k % (32 if LAYOUTS[kind].scheme == "b32" else 256):
                    continue  # a K type needs rows of whole 256-weight blocks
                for rows in args.rows:
                    cases = cases_for(n, k, kind, rows)
                    for calls, _ in cases.values():  # every case warm before any is timed
                        calls[0]()
                    best = {case: float("inf") for case in cases}
                    for _ in range(args.rounds):  # round-robin: a load spike hits every case
                        for case, (calls, _) in cases.items():
                            reps = 1 if case == "pytorch" else 2
                            best[case] = min(best[case], best_seconds(calls, reps))
                    for case, (_, size) in cases.items():
                        row = {"shape": f"{shape_set} {name} {n}x{k}", "type": kind, "rows": rows}
                        row |= {"case": case, "ms": best[case] * 1e3, "bytes": size}
                        row["GB/s"] = size / best[case] / 1e9
                        rows_out.append(row)
                        print(json.dumps(row), flush=True)
    return rows_out


def table(results: list[dict], bandwidth: float) -> str:
    cases = ["pocketlm", "pytorch", "int8", "int4", "bf16"]
    lines = [
        f"Read bandwidth (sum of 512 MB, best of 8): {bandwidth:.1f} GB/s. "
        "ms per matrix (GB/s of that case's own weights).",
        "",
        "| shape | type | rows | " + " | ".join(cases) + " |",
        "|---|---|---|" + "---|" * len(cases),
    ]
    keys = sorted({(r["shape"], r["type"], r["rows"]) for r in results}, key=_order(results))
    for key in keys:
        got = {r["case"]: r for r in results if (r["shape"], r["type"], r["rows"]) == key}
        cells = [f"{got[c]['ms']:.3f} ({got[c]['GB/s']:.1f})" if c in got else "—" for c in cases]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _order(results: list[dict]):  # noqa: ANN202
    first = {}
    for i, r in enumerate(results):
        first.setdefault((r["shape"], r["type"], r["rows"]), i)
    return first.__getitem__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="smollm2,7b", help="smollm2, 7b or both")
    parser.add_argument("--types", default="Q4_0,Q4_1,Q4_K,Q6_K")
    parser.add_argument("--rows", default="1,4", help="rows of x, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.types = list(LAYOUTS) if args.types == "all" else args.types.split(",")
    args.rows = [int(r) for r in args.rows.split(",")]
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    with torch.inference_mode():
        results = measure(args)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
    RESULTS.mkdir(parents=True, exist_ok=True)
    header = f"# GGUF kernels, {stamp} UTC, {args.threads} threads\n\n`{' '.join(sys.argv)}`\n\n"
    (RESULTS / f"gguf_kernels-{stamp}.md").write_text(header + table(results, bandwidth))
    (RESULTS / f"gguf_kernels-{stamp}.json").write_text(json.dumps(results, indent=1))
    print(table(results, bandwidth))


if __name__ == "__main__":
    main()
