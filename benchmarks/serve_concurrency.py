"""Aggregate tokens/s of `pocketlm serve` with 1, 4 and 16 concurrent streaming clients.

Starts `pocketlm serve MODEL --port 0 --max-batch 16` (or the largest client count, and
`--quantize` as given) as a subprocess on 127.0.0.1, then
for each client count runs that many threads at once, each streaming one completion of
--tokens new tokens (greedy, EOS suppressed with logit_bias so every request runs its
full length), and reports total generated tokens / wall time. One warm-up request first.
Then the time to first token of a ~2,000-token prompt, cold, and again with a new question
after the same prefix (warm: the prefix cache holds it; benchmarks/prefix_cache.py has the
full comparison, with the cache off too).
The ratio between counts is the figure of merit (continuous batching shares each decode
step); absolute speeds depend on the machine and its load.

    python benchmarks/serve_concurrency.py                  # the embedded SmolLM2-135M
    python benchmarks/serve_concurrency.py --gpt2-small     # a random GPT-2-small-shaped model
    python benchmarks/serve_concurrency.py --quantize int8 --levels 1,4,16,32
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

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


def random_gpt2_small(folder: Path) -> Path:
    """A GPT-2 small (124M) with random weights, in HF layout with the GPT-2 vocabulary."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from checkpoints import make_gpt2

    return make_gpt2(folder, n_embd=768, n_layer=12, n_head=12, n_positions=1024)


def start_server(
    model: str, *, threads: int, max_batch: int, quantize: str | None
) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    options = ["--port", "0", "--max-batch", str(max_batch), "--offline"]
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
        raise SystemExit(f"the server did not start: {line!r}")
    return process, line.split(" at ")[1].split()[0]


def eos_bias(model: str) -> dict[str, int]:
    import pocketlm

    tokenizer = pocketlm.load(model if model != "default" else None, offline=True).tokenizer
    return {str(i): -100 for i in tokenizer.eos_ids}


def run_level(
    client: openai.OpenAI, model: str, *, clients: int, tokens: int, bias: dict
) -> tuple[int, float]:
    def one(i: int) -> int:
        stream = client.completions.create(
            model=model,
            prompt=PROMPTS[i % len(PROMPTS)],
            max_tokens=tokens,
            temperature=0,
            logit_bias=bias,
            stream=True,
            stream_options={"include_usage": True},
        )
        return [c for c in stream][-1].usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(one, range(clients)))
    return total, time.perf_counter() - start


def prefix_ttft(client: openai.OpenAI) -> None:
    """Print the time to first token with a new ~2,000-token prefix, cold then warm."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from prefix_cache import document, first_token

    prefix = document(int(time.time()), 1800)
    cold, _, n = first_token(client, prefix + "Question: the first word?\nAnswer:", tokens=4)
    warm, _, _ = first_token(client, prefix + "Question: the last word?\nAnswer:", tokens=4)
    print(f"time to first token, {n}-token prompt: cold {cold:.2f} s, warm {warm:.2f} s "
          f"({warm / cold:.2f} of cold: the shared prefix from the prefix cache)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model", nargs="?", default=None, help="model name or path (default: SmolLM2-135M)"
    )
    parser.add_argument(
        "--gpt2-small", action="store_true", help="benchmark a random GPT-2-small-shaped model"
    )
    parser.add_argument(
        "--tokens", type=int, default=64, help="new tokens per request (default 64)"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads in the server (default 2)"
    )
    parser.add_argument("--levels", default="1,4,16", help="client counts (default 1,4,16)")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="the server's --quantize")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(random_gpt2_small(Path(tmp) / "gpt2-small")) if args.gpt2_small else args.model
        bias = eos_bias(model or "default")
        levels = [int(n) for n in args.levels.split(",")]
        process, url = start_server(
            model or "smollm2-135m",
            threads=args.threads,
            max_batch=max(16, *levels),
            quantize=args.quantize,
        )
        try:
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
            name = client.models.list().data[0].id
            run_level(client, name, clients=1, tokens=8, bias=bias)  # warm-up
            print(
                f"model {name} ({args.quantize or 'fp32'}), {args.tokens} new tokens per request, "
                f"{args.threads} torch threads, "
                f"load average {os.getloadavg()[0]:.1f}"
            )
            base = None
            for level in levels:
                total, seconds = run_level(
                    client, name, clients=level, tokens=args.tokens, bias=bias
                )
                speed = total / seconds
                base = base or speed
                print(
                    f"{level:3d} clients: {total:5d} tokens in {seconds:6.2f} s = {speed:7.1f} tok/s "
                    f"({speed / base:.1f}x one client)",
                    flush=True,
                )
            prefix_ttft(client)
        finally:
            process.terminate()
            threading.Thread(target=process.wait, daemon=True).start()


if __name__ == "__main__":
    main()
