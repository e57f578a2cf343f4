"""`pocketlm run` on a busy machine: does it keep at least half its quiet speed?

Runs `pocketlm run PROMPT -n 32 -t 0 --stats` as a user would (a fresh process each
time) in pairs: once on the machine as it is, then at once again while busy loops
(pure-Python `while True`, one per --busy) hold other cores; with the default thread
count and with fixed counts. Prints each pair's decode speed, start-to-first-token and
thread choice, and the median busy/as-is ratio per setting (exit status 1 when the
default keeps less than half its speed). Pairs, not two phases, because on a shared
machine the other jobs' load drifts more in minutes than in seconds.

    python benchmarks/busy_machine.py                 # default vs --threads 1 vs all cores
    python benchmarks/busy_machine.py --repeats 5 --busy 1 --model gpt2

docs/threads.md has the figures measured on the 2-core development machine.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

SPEED = re.compile(r"speed: ([\d.]+) tokens/s")
FIRST = re.compile(r"start to first token: ([\d.]+) s")
CHOSEN = re.compile(r"threads: (\d+ \([^)]*\))")
POCKETLM = [sys.executable, "-m", "pocketlm"]


def one_run(model: list[str], threads: str | None, prompt: str) -> tuple[float, float, str]:
    command = [*POCKETLM, "run", *model, prompt, "-n", "32", "-t", "0", "--stats"]
    if threads is not None:
        command += ["--threads", threads]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    err = result.stderr
    return float(SPEED.search(err)[1]), float(FIRST.search(err)[1]), CHOSEN.search(err)[1]


def busy_loops(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def paired_run(model: list[str], threads: str | None, args: argparse.Namespace) -> tuple:
    """One run as the machine is, then one with the busy loops: the two halves of a pair
    are seconds apart, so what other jobs do to the machine changes little in between."""
    quiet = one_run(model, threads, args.prompt)
    loops = busy_loops(args.busy)
    try:
        time.sleep(1)  # the loops are running (and counted as busy) before pocketlm starts
        busy = one_run(model, threads, args.prompt)
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    return quiet, busy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: pocketlm's default)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--repeats", type=int, default=3, help="pairs per setting (default 3)")
    parser.add_argument("--busy", type=int, default=1, help="busy loops to start (default 1)")
    parser.add_argument(
        "--threads", default="1,all", help="fixed counts to compare with the default"
    )
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    settings = [None] + [str(cores) if t == "all" else t for t in args.threads.split(",")]
    model = [args.model] if args.model else []
    one_run(model, "1", args.prompt)  # kernels built, files in the page cache
    print(f"{time.strftime('%Y-%m-%d %H:%M')} UTC, {cores} CPUs, {args.busy} busy loop(s)")
    ratios = {}
    for threads in settings:
        label = "default" if threads is None else f"--threads {threads}"
        pairs = []
        for _ in range(args.repeats):
            load = os.getloadavg()[0]
            pairs.append(paired_run(model, threads, args))
            quiet, busy = pairs[-1]
            print(
                f"  {label:12} load {load:5.2f}  as is: {quiet[0]:6.1f} tok/s, first token at "
                f"{quiet[1]:5.2f} s, threads {quiet[2]}  |  busy: {busy[0]:6.1f} tok/s, "
                f"{busy[1]:5.2f} s, threads {busy[2]}",
                flush=True,
            )
        ratios[label] = statistics.median(busy[0] / quiet[0] for quiet, busy in pairs)
    for label, ratio in ratios.items():
        print(f"{label}: busy/as-is decode speed, median of the pairs: {ratio:.0%}")
    return 0 if ratios["default"] >= 0.5 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
