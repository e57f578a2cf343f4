"""Per-core compute speed of pocketlm's GGUF decode kernel (kernels/gguf_gemv.cpp): one
thread, one row of x, the weights hot in L2, so memory plays no part -- what one core can
chew through. On the 2-core EPYC this project measures on, a 7B Q4_K_M decode needs
~19 GB/s a core to keep up with the machine's ~38 GB/s of read bandwidth, so below that
the kernel, not memory, sets the decode speed.

Per type: the best of many calls on (64, 2048) and (512, 2048) matrices of random blocks
(as benchmarks/gguf_kernels.py makes them); the figure is the slope, extra bytes over
extra time, which leaves out each call's fixed cost (Python, quantizing x: ~15 us).
Timings that short survive a busy machine: a best of 300 finds quiet moments.

With `--against DIR` (another checkout of pocketlm, e.g. `git worktree add /tmp/base
HEAD~1`), each round measures that checkout and this one, one after the other, each in
its own process with its own kernel build (TORCH_EXTENSIONS_DIR under /tmp): an A/B.

    python benchmarks/gguf_compute.py --types Q4_K,Q6_K,Q8_0 --rounds 2
    python benchmarks/gguf_compute.py --against /tmp/base --rounds 2

Writes benchmarks/results/gguf_compute-<UTC stamp>.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
K = 2048
HEIGHTS = (64, 512)


def worker(types: list[str]) -> None:
    """In the child: {type: GB/s} on one thread, printed as JSON."""
    import torch

    torch.set_num_threads(1)
    # pocketlm first, from PYTHONPATH (the checkout measured): gguf_kernels, imported
    # next for its random blocks, puts this checkout's src first on sys.path.
    from pocketlm.kernels.gguf import GGUFLinear

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gguf_kernels import gguf_bytes, nbytes

    x = torch.randn(1, K)
    out = {}
    with torch.inference_mode():
        for kind in types:
            layers = {
                n: GGUFLinear.from_gguf(gguf_bytes(kind, n, K), kind, (n, K)) for n in HEIGHTS
            }
            seconds = {n: best_seconds(lambda m=m: m(x)) for n, m in layers.items()}
            extra = nbytes(layers[HEIGHTS[1]]) - nbytes(layers[HEIGHTS[0]])
            out[kind] = extra / (seconds[HEIGHTS[1]] - seconds[HEIGHTS[0]]) / 1e9
    out["pocketlm"] = str(Path(sys.modules["pocketlm"].__file__).parent)  # which checkout
    print(json.dumps(out), flush=True)


def best_seconds(call, *, tries: int = 300, calls: int = 10) -> float:  # noqa: ANN001
    """Seconds per call: the best of `tries` means over `calls` calls."""
    best = float("inf")
    for _ in range(tries):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def run_side(checkout: Path, types: list[str]) -> dict[str, float]:
    """The worker in its own process on `checkout`'s sources and kernel build."""
    tag = hashlib.sha1(str(checkout.resolve()).encode()).hexdigest()[:10]
    build = Path("/tmp") / f"pocketlm-compute-{tag}"  # one build per checkout, kept
    env = os.environ | {"PYTHONPATH": str(checkout / "src"), "TORCH_EXTENSIONS_DIR": str(build)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(types)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default="Q4_K,Q5_K,Q6_K,Q4_0,Q8_0")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--against", type=Path, help="another checkout, measured first")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker.split(","))
    types = args.types.split(",")
    sides = {"this": ROOT} if args.against is None else {"against": args.against, "this": ROOT}
    rows = []
    for round_ in range(args.rounds):
        for side, checkout in sides.items():
            load = os.getloadavg()[0]
            got = run_side(checkout, types)
            rows.append({"round": round_, "side": side, "load": load} | got)
            print(json.dumps(rows[-1]), flush=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
    lines = [f"# GGUF decode kernel, per-core compute, {stamp} UTC", "",
             f"`python benchmarks/gguf_compute.py {' '.join(sys.argv[1:])}`"
             + (f" (against: `{args.against}`)" if args.against else ""), "",
             "GB/s of weights one thread multiplies by one row of x, weights hot in L2 "
             f"(slope between {HEIGHTS[0]} and {HEIGHTS[1]} rows of {K}).", "",
             "| round | side | load | " + " | ".join(types) + " |",
             "|---|---|---|" + "---|" * len(types)]  # fmt: skip
    for row in rows:
        cells = [f"{row[t]:.1f}" for t in types]
        lines.append(
            f"| {row['round']} | {row['side']} | {row['load']:.1f} | " + " | ".join(cells) + " |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"gguf_compute-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return None


if __name__ == "__main__":
    main()
