"""Decode speed with and without a JSON-schema constraint, 1 and 16 concurrent requests.

The server's continuous-batching Scheduler runs in this process (no HTTP, so the figure
is the engine's): each round submits N requests at once (a short chat prompt, 128 new
tokens, temperature 0.7, seeded) and times them until the last one ends; tokens/s =
all tokens generated / that wall time. Three variants, interleaved round by round so the
machine's load falls on all of them alike:
  - free: no constraint (end-of-text suppressed with logit_bias so every request runs
    its full length);
  - json: a JSON schema (an array of at least 40 objects with typed, bounded fields, so
    the grammar cannot complete before 128 tokens), the rows' next masks computed on the
    Scheduler's worker thread beside the forward pass (the default);
  - json, inline: the same, each row's mask computed when it samples (overlap off).
The median over rounds is reported; the target is json at most 10% slower than free at 1.
Then, as a figure that the machine's load moves less: what the constraint adds to one
token's sampling (mask, apply, accept) against the same Sampler unconstrained, on real
logits, interleaved token by token, beside the time of one decode step; with one torch
thread and with --threads (on an overloaded machine, torch splitting a 49k-logit
elementwise op over 2 threads costs milliseconds of waiting, free or constrained alike).

    PYTHONPATH=src python benchmarks/structured.py [--gguf PATH] [--rounds 3] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from pathlib import Path

import torch

import pocketlm
from pocketlm.generate.params import GenerationParams
from pocketlm.generate.request import Sampler
from pocketlm.sampling import SamplingParams
from pocketlm.serve.scheduler import Event, Request, Scheduler

SCHEMA = {
    "type": "array",
    "minItems": 40,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["name", "age", "role", "score"],
        "additionalProperties": False,
    },
}
TOKENS = 128


def run_round(
    scheduler: Scheduler, prompt: list[int], params: list[GenerationParams]
) -> tuple[int, float]:
    """Submit one request per params at once; (tokens generated, seconds until all end)."""
    done = threading.Semaphore(0)
    counts = [0] * len(params)

    def emitter(i: int):
        def emit(event: Event) -> None:
            if event.finish_reason is not None:
                counts[i] = event.completion_tokens
                done.release()

        return emit

    requests = [Request(prompt, p, emitter(i)) for i, p in enumerate(params)]
    start = time.perf_counter()
    scheduler.submit(requests)
    for _ in requests:
        done.acquire()
    return sum(counts), time.perf_counter() - start


def sampling_cost(lm, prompt: list[int], *, steps: int = 200) -> tuple[float, float, float]:
    """Median seconds of one token's sampling, unconstrained and under SCHEMA (the tokens
    the constrained sampler picks are fed to both), and of one decode step."""
    session = lm.session()
    logits = session.sequence.prefill(prompt)
    free = Sampler(lm.params(temperature=0.7, seed=0), prompt, vocab_size=lm.vocab_size,
                   device="cpu")  # fmt: skip
    constrained = Sampler(lm.params(temperature=0.7, seed=0, schema=SCHEMA), prompt,
                          vocab_size=lm.vocab_size, device="cpu", tokenizer=lm.tokenizer)  # fmt: skip
    times: dict[str, list[float]] = {"free": [], "json": [], "step": []}
    for _ in range(steps):
        start = time.perf_counter()
        free.step(logits)
        middle = time.perf_counter()
        token = constrained.step(logits).token
        end = time.perf_counter()
        logits = session.sequence.step(token)
        times["free"].append(middle - start)
        times["json"].append(end - middle)
        times["step"].append(time.perf_counter() - end)
    return tuple(statistics.median(t) for t in times.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path.home() / ".local/share/pocketlm/models/smollm2-135m"
    parser.add_argument("--gguf", default=str(default / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--dtype", default=None, help="fp32 to dequantize (default: as stored)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", default="1,16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = pocketlm.load(args.gguf, device="cpu", dtype=args.dtype)
    chat = [{"role": "user", "content": "List the members of our club as JSON."}]
    prompt = lm.tokenizer.encode(lm.tokenizer.render_chat(chat), add_bos=False)
    levels = [int(n) for n in args.clients.split(",")]
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=max(levels))
    scheduler.start()
    no_eos = {i: -100.0 for i in lm.tokenizer.eos_ids}
    json_params = lm.params(schema=SCHEMA)  # checked once; each request binds its own state

    def params(n: int, constrained: bool) -> list[GenerationParams]:
        return [
            GenerationParams(
                SamplingParams(temperature=0.7, seed=i, logit_bias=no_eos),
                max_tokens=TOKENS,
                grammar=json_params.grammar if constrained else None,
            )
            for i in range(n)
        ]

    variants = {"free": (False, True), "json": (True, True), "json, inline": (True, False)}
    results: dict[tuple[int, str], list[float]] = {}
    run_round(scheduler, prompt, params(1, True))  # warm-up: the vocabulary, the kernels
    for _ in range(args.rounds):
        for n in levels:
            for name, (constrained, overlap) in variants.items():
                scheduler.overlap_masks = overlap
                tokens, seconds = run_round(scheduler, prompt, params(n, constrained))
                assert tokens == n * TOKENS, (name, n, tokens)
                results.setdefault((n, name), []).append(tokens / seconds)
    scheduler.stop()
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {Path(args.gguf).name} "
        f"({args.dtype or 'as stored'}), {args.threads} threads, load {os.getloadavg()}, "
        f"median of {args.rounds} rounds, {TOKENS} tokens a request"
    )
    print("| clients | free tok/s | json tok/s | json, inline masks tok/s | json / free |")
    print("|---|---|---|---|---|")
    for n in levels:
        free, json_, inline = (statistics.median(results[(n, v)]) for v in variants)
        print(f"| {n} | {free:.1f} | {json_:.1f} | {inline:.1f} | {json_ / free:.2f} |")
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        free, json_, step = sampling_cost(lm, prompt)
        print(f"\n{threads} thread(s): one token's sampling {free * 1e6:.0f} us free, "
              f"{json_ * 1e6:.0f} us under the schema (+{(json_ - free) * 1e6:.0f} us); one "
              f"decode step {step * 1e3:.1f} ms: the constraint adds "
              f"{(json_ - free) / (step + free):.1%} to a token at batch 1")  # fmt: skip


if __name__ == "__main__":
    main()
