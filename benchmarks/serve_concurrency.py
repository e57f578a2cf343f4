"""Aggregate tokens/s of `pocketlm serve` with 1, 4 and 16 concurrent clients, beside
llama.cpp's own server (llama-server, continuous batching) on the same GGUF file, in one
run; and the time to first token with a shared ~2,000-token prefix, cold and warm, on both.

Both servers run at once on 127.0.0.1 with the same thread count (2): `pocketlm serve FILE
--threads 2 --max-batch 16` (the GGUF as stored) and `llama-server -m FILE -t 2 -tb 2 -np 16
-cb -c 16*CTX` (16 slots of CTX tokens each), built from the llama-cpp-python 0.3.36 sdist
by benchmarks/llama_tools.py. An idle server takes no CPU, so they are measured in turn,
levels interleaved (pocketlm 1, llama.cpp 1, pocketlm 4, llama.cpp 4, ...) and repeated
(--repeats, median). At each level that many threads at once each send one completion of
the same prompt set through /v1/completions: --tokens new tokens, greedy, the end-of-text
tokens suppressed (logit_bias -100 on the tokenizer's EOS ids, which both servers honour,
and llama-server's own `ignore_eos`) so every request runs its full length; tok/s is the
generated tokens (each server's `usage`) over the wall time. One warm-up request each first.

Time to first token: a new made-up ~2,000-token document (benchmarks/prefix_cache.py) +
question A, streamed (cold: nothing is cached), then the same document + question B (warm:
pocketlm's prefix cache; llama-server's `cache_prompt` on the slot that holds it); median
over --rounds documents, and for llama.cpp the prompt tokens it computed (`timings.prompt_n`).

    python benchmarks/serve_concurrency.py                       # SmolLM2-135M Q8_0, both
    python benchmarks/serve_concurrency.py FILE.gguf --repeats 5
    python benchmarks/serve_concurrency.py --gpt2-small          # pocketlm alone (no GGUF)

Ratios are the figure of merit; absolute speeds depend on the machine and its load (the
load average is printed before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import openai

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from prefix_cache import document  # noqa: E402

DEFAULT_GGUF = Path.home() / ".cache" / "pocketlm-bench" / "gguf" / "smollm2-135m.Q8_0.gguf"
PROMPTS = [
    "The history of the city",
    "Once upon a time",
    "In a distant galaxy",
    "The recipe calls for",
    "Scientists have discovered",
    "My favourite book",
    "The train left the station",
    "Dear diary",
]
QUESTIONS = ("Question: what is the first word of the record?\nAnswer:",
             "Question: which word comes up most often?\nAnswer:")  # fmt: skip


@dataclass
class Engine:
    name: str
    process: subprocess.Popen
    client: openai.OpenAI
    model: str = ""
    extra: dict = field(default_factory=dict)  # request fields only this server reads

    def stop(self) -> None:
        self.process.terminate()
        try:  # llama-server finishes the requests in flight first (an interrupted run's)
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def random_gpt2_small(folder: Path) -> Path:
    """A GPT-2 small (124M) with random weights, in HF layout with the GPT-2 vocabulary."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from checkpoints import make_gpt2

    return make_gpt2(folder, n_embd=768, n_layer=12, n_head=12, n_positions=1024)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=900)


def start_pocketlm(model: str, *, threads: int, max_batch: int, quantize: str | None) -> Engine:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    options = ["--port", "0", "--max-batch", str(max_batch), "--threads", str(threads),
               "--offline", "--quiet"]  # fmt: skip
    if quantize:
        options += ["--quantize", quantize]
    process = subprocess.Popen(
        [sys.executable, "-m", "pocketlm.cli.main", "serve", model, *options],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = process.stdout.readline()
    if not line.startswith("serving "):
        process.kill()
        raise SystemExit(f"pocketlm serve did not start: {line!r}")
    return Engine("pocketlm", process, client(line.split(" at ")[1].split()[0]))


def start_llama(gguf: Path, *, threads: int, slots: int, context: int) -> Engine:
    from llama_tools import binary

    port = free_port()
    command = [str(binary("llama-server")), "-m", str(gguf), "--host", "127.0.0.1",
               "--port", str(port), "-t", str(threads), "-tb", str(threads), "-np", str(slots),
               "-cb", "-c", str(slots * context), "--no-webui"]  # fmt: skip
    log = open(Path(tempfile.gettempdir()) / f"llama-server-{port}.log", "w")  # noqa: SIM115
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"llama-server exited ({process.returncode}): see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if json.load(r).get("status") == "ok":
                    break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        process.kill()
        raise SystemExit(f"llama-server did not come up: see {log.name}")
    extra = {"ignore_eos": True, "cache_prompt": True}
    return Engine("llama.cpp", process, client(f"http://127.0.0.1:{port}/v1"), extra=extra)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eos_bias(model: str) -> dict[str, int]:
    import pocketlm

    tokenizer = pocketlm.load(model if model != "default" else None, offline=True).tokenizer
    return {str(i): -100 for i in tokenizer.eos_ids}


def run_level(
    client: openai.OpenAI,
    model: str,
    *,
    clients: int,
    tokens: int,
    bias: dict,
    extra: dict | None = None,
) -> tuple[int, float]:
    """(tokens generated, seconds) of `clients` requests at once."""

    def one(i: int) -> int:
        reply = client.completions.create(
            model=model,
            prompt=PROMPTS[i % len(PROMPTS)],
            max_tokens=tokens,
            temperature=0,
            logit_bias=bias,
            extra_body=extra,
        )
        return reply.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(one, range(clients)))
    return total, time.perf_counter() - start


def first_token(engine: Engine, prompt: str, *, tokens: int) -> tuple[float, int, int | None]:
    """Seconds to the first streamed text, the prompt's tokens, and those the server
    computed (llama-server reports it in `timings`; None for pocketlm)."""
    start, ttft, computed, usage = time.perf_counter(), None, None, None
    stream = engine.client.completions.create(
        model=engine.model,
        prompt=prompt,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=engine.extra,
    )
    for chunk in stream:
        if ttft is None and any(c.text for c in chunk.choices):
            ttft = time.perf_counter() - start
        usage = chunk.usage or usage
        timings = (chunk.model_extra or {}).get("timings")
        computed = timings.get("prompt_n", computed) if timings else computed
    return ttft, usage.prompt_tokens, computed


def throughput(engines: list[Engine], args: argparse.Namespace, bias: dict) -> dict:
    """{(engine, level): [tok/s per repeat]}, levels interleaved across engines."""
    speeds, short = {}, {}
    for repeat in range(args.repeats):
        for level in args.levels:
            for engine in engines:
                total, seconds = run_level(engine.client, engine.model, clients=level,
                                           tokens=args.tokens, bias=bias, extra=engine.extra)  # fmt: skip
                speeds.setdefault((engine.name, level), []).append(total / seconds)
                missing = level * args.tokens - total  # tokens an early stop left out
                short[engine.name] = short.get(engine.name, 0) + missing
                print(f"  repeat {repeat}: {engine.name:9s} {level:3d} clients "
                      f"{total / seconds:7.1f} tok/s", file=sys.stderr, flush=True)  # fmt: skip
    return {"speeds": speeds, "short": short}


def prefix_ttft(engines: list[Engine], args: argparse.Namespace) -> dict:
    """{engine: (cold s, warm s, prompt tokens, warm prompt tokens computed)}, the times
    medians over the rounds (a new document each)."""
    out, run = {}, int(time.time())  # documents new to both servers, the same for both
    prefixes = [document(run * 100 + r, args.prefix_words) for r in range(args.rounds)]
    for engine in engines:
        cold, warm, computed = [], [], []
        for prefix in prefixes:
            seconds, size, _ = first_token(engine, prefix + QUESTIONS[0], tokens=4)
            cold.append(seconds)
            seconds, _, n = first_token(engine, prefix + QUESTIONS[1], tokens=4)
            warm.append(seconds)
            computed.append(n)
        out[engine.name] = (statistics.median(cold), statistics.median(warm), size, computed)
    return out


def report(engines: list[Engine], result: dict, ttft: dict, args: argparse.Namespace,
           loads: tuple[str, str]) -> str:  # fmt: skip
    speeds = result["speeds"]
    names = [e.name for e in engines]
    lines = [
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {args.label}, "
        f"{args.tokens} new tokens per request (greedy, EOS suppressed), {args.threads} threads "
        f"each, median of {args.repeats}; load average {loads[0]} before, {loads[1]} after",
        "",
        "| clients | "
        + " | ".join(f"{n} tok/s" for n in names)
        + (" | pocketlm / llama.cpp |" if len(names) == 2 else " |"),
        "|---:|" + "---:|" * (len(names) + (len(names) == 2)),
    ]
    for level in args.levels:
        medians = [statistics.median(speeds[(n, level)]) for n in names]
        row = f"| {level} | " + " | ".join(f"{m:.1f}" for m in medians)
        lines.append(row + (f" | {medians[0] / medians[1]:.2f} |" if len(names) == 2 else " |"))
    if any(result["short"].values()):
        lines.append(f"tokens missing from requests that stopped early: {result['short']}")
    lines.append("")
    for name, (cold, warm, size, computed) in ttft.items():
        seen = f"; prompt tokens computed when warm: {computed}" if computed[0] is not None else ""
        lines.append(f"time to first token, {size}-token prompt sharing all but its question, "
                     f"{name}: cold {cold:.3f} s, warm {warm:.3f} s ({warm / cold:.2f} of "
                     f"cold){seen}")  # fmt: skip
    return "\n".join(lines)


def loadavg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None,
                        help=f"a GGUF file for both servers (default {DEFAULT_GGUF.name}), or a "
                        "model pocketlm alone serves")  # fmt: skip
    parser.add_argument("--gpt2-small", action="store_true",
                        help="pocketlm alone on a random GPT-2-small-shaped model")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request (64)")
    parser.add_argument("--threads", type=int, default=2, help="threads per server (2)")
    parser.add_argument("--levels", default="1,4,16", help="client counts (1,4,16)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each level (3)")
    parser.add_argument("--rounds", type=int, default=3, help="prefixes for the TTFT (3)")
    parser.add_argument("--prefix-words", type=int, default=1800, help="~2,000 tokens")
    parser.add_argument("--context", type=int, default=2560,
                        help="llama-server's context per slot (2560: the prefix fits)")  # fmt: skip
    parser.add_argument("--no-llama", action="store_true", help="pocketlm alone")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="pocketlm's --quantize")
    args = parser.parse_args()
    args.levels = [int(n) for n in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.gpt2_small:
            model = str(random_gpt2_small(Path(tmp) / "gpt2-small"))
        else:
            model = args.model or str(DEFAULT_GGUF)
        gguf = model.endswith(".gguf") and Path(model).is_file()
        both = gguf and not args.no_llama and not args.quantize
        args.label = f"{Path(model).name}" + (f" (pocketlm --quantize {args.quantize})"
                                              if args.quantize else "")  # fmt: skip
        bias = eos_bias(model)
        engines = [start_pocketlm(model, threads=args.threads, max_batch=max(16, *args.levels),
                                  quantize=args.quantize)]  # fmt: skip
        try:
            if both:
                engines.append(start_llama(Path(model), threads=args.threads,
                                           slots=max(16, *args.levels), context=args.context))  # fmt: skip
            for engine in engines:
                engine.model = engine.client.models.list().data[0].id
                warm_up = dict(clients=1, tokens=8, bias=bias, extra=engine.extra)
                run_level(engine.client, engine.model, **warm_up)
            before = loadavg()
            result = throughput(engines, args, bias)
            ttft = prefix_ttft(engines, args)
            print(report(engines, result, ttft, args, (before, loadavg())))
        finally:
            for engine in engines:
                engine.stop()


if __name__ == "__main__":
    main()
