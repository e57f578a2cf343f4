"""`pocketlm bench [MODEL]`: how fast pocketlm runs MODEL here, and how close it is to the
memory-bandwidth bound (bandwidth / weight bytes read per token).

Printing only; the measuring is `pocketlm.generate.benchmark`. The comparison with transformers and
llama.cpp on the same weights is benchmarks/peers.py in the source tree.
"""

import argparse
import json
import os
import sys

from pocketlm.cli import common
from pocketlm.errors import PocketLMError

MODES = {
    "default": {},  # what a load with no flags gives (a GGUF: its own quantization)
    "fp32": dict(dtype="fp32"),
    "bf16": dict(dtype="bf16"),
    "int8": dict(dtype="fp32", quantize="int8"),
    "int4": dict(dtype="fp32", quantize="int4"),
}
COMPILED = "+compile"  # a mode with this suffix decodes through torch.compile


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure decode/prefill speed and the memory-bandwidth bound",
        description="Measure MODEL (default: the embedded SmolLM2-135M) at batch 1: decode "
                    "tokens/s, prefill tokens/s, time to first token, peak memory, and the "
                    "fraction of the bandwidth bound reached.",
    )  # fmt: skip
    parser.add_argument("model", nargs="?", default=None, help="model name, folder or .gguf file")
    parser.add_argument(
        "--modes",
        default="default,int8",
        help="comma-separated: default (no flags: a GGUF as stored), fp32, bf16, int8, int4, "
        "each optionally +compile (e.g. int4+compile; default: default,int8)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    common.add_threads_option(parser)
    parser.add_argument(
        "--json", default=None, metavar="FILE", help="also write the results as JSON"
    )
    parser.add_argument("--offline", action="store_true", help="never touch the network")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    # the engine loads here, not at the top: the CLI starts without torch
    from pocketlm.api import load
    from pocketlm.generate.benchmark import measure, memory_bandwidth

    common.setup_logging()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := [m for m in modes if m.removesuffix(COMPILED) not in MODES]:
        raise PocketLMError(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    for name, value in (
        ("prompt", args.prompt_tokens),
        ("new", args.new_tokens),
        ("prefill", args.prefill_tokens),
    ):
        if value < 1:
            raise PocketLMError(f"--{name}-tokens must be at least 1 (got {value})")
    threads = common.use_threads(args)
    bandwidth = memory_bandwidth()
    print(f"read bandwidth {bandwidth:.1f} GB/s, threads: {threads}", file=sys.stderr)
    results = []
    for mode in modes:
        lm = load(args.model, offline=args.offline, **MODES[mode.removesuffix(COMPILED)])
        m = measure(lm.model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                    prefill_tokens=args.prefill_tokens, compile=mode.endswith(COMPILED))  # fmt: skip
        bound = bandwidth * 1e9 / m.bytes_per_token
        results.append({"model": lm.name, "mode": mode, **m.as_dict(), "bound_tok_s": bound,
                        "threads": threads.count})  # fmt: skip
        print(
            f"{lm.name} {mode:12} decode {m.decode_tok_s:6.1f} tok/s ({m.decode_tok_s / bound:4.0%} of the "
            f"{bound:.0f} tok/s bound)  prefill {m.prefill_tok_s:6.0f} tok/s  TTFT {m.ttft_ms:5.0f} ms  "
            f"peak RSS {m.peak_rss_mb:5.0f} MB"
        )
        del lm
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"bandwidth_gb_s": bandwidth, "results": results}, f, indent=1)
        os.replace(tmp, args.json)
    return 0
