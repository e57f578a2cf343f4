"""`pocketlm run` on a busy machine: does it keep at least half its quiet speed?

Runs `pocketlm run PROMPT -n 32 -t 0 --stats` as a user would (a fresh process each
time), first on the machine as it is, then while busy loops (pure-Python `while True`,
one per --busy) hold other cores, each with the default thread count and with fixed
counts. Prints the median decode speed and start-to-first-token of each, the machine's
load, and the default's busy/quiet ratio.

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


def measure(settings: list[str | None], args: argparse.Namespace) -> dict:
    model = [args.model] if args.model else []
    results = {}
    for threads in settings:
        runs = [one_run(model, threads, args.prompt) for _ in range(args.repeats)]
        speeds, firsts = [r[0] for r in runs], [r[1] for r in runs]
        results[threads] = (statistics.median(speeds), statistics.median(firsts), runs[-1][2])
        label = "default" if threads is None else f"--threads {threads}"
        print(
            f"  {label:12} decode {results[threads][0]:6.1f} tok/s (runs: "
            f"{', '.join(f'{s:.0f}' for s in speeds)})  start to first token "
            f"{results[threads][1]:5.2f} s  threads {runs[-1][2]}",
            flush=True,
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: pocketlm's default)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=1, help="busy loops to start (default 1)")
    parser.add_argument(
        "--threads", default="1,all", help="fixed counts to compare with the default"
    )
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    settings = [None] + [str(cores) if t == "all" else t for t in args.threads.split(",")]
    one_run([args.model] if args.model else [], "1", args.prompt)  # kernels built, files cached
    print(f"{time.strftime('%Y-%m-%d %H:%M')} UTC, {cores} CPUs", flush=True)
    print(f"as the machine is (load {os.getloadavg()[0]:.2f}):", flush=True)
    quiet = measure(settings, args)
    loops = busy_loops(args.busy)
    try:
        time.sleep(2)
        print(f"with {args.busy} busy loop(s) (load {os.getloadavg()[0]:.2f}):", flush=True)
        busy = measure(settings, args)
        print(f"  load at the end {os.getloadavg()[0]:.2f}")
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    for threads in settings:
        label = "default" if threads is None else f"--threads {threads}"
        ratio = busy[threads][0] / quiet[threads][0]
        print(f"{label}: busy/quiet decode speed {ratio:.0%}")
    return 0 if busy[None][0] >= 0.5 * quiet[None][0] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
