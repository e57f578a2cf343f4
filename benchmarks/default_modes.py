"""Which default for an HF checkpoint (issue 18, item 3): pocketlm's fp32, bf16, int8 and
int4 on a real pretrained model in HF layout, each beside transformers fp32 on the same
folder -- how often 32 greedy tokens agree (and where the first parting is, with
transformers' margin between its two best tokens there), the largest logit difference on
the prompts, and decode tokens/s, the modes interleaved round by round (best of ROUNDS),
in one process on one machine.

The folder: the embedded SmolLM2-135M-Instruct dequantized to fp32 safetensors by
transformers (benchmarks/gguf_fidelity.py makes it under ~/.cache/pocketlm-bench/smollm2/hf).

    python benchmarks/default_modes.py [--folder DIR] [--rounds 3] [--threads 2]
"""

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import pocketlm

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at",
    "The best way to learn a language is",
    "In 1969, the first man to walk on the moon was",
]
MODES = {"fp32": {}, "bf16": {"dtype": "bf16"}, "int8": {"quantize": "int8"},
         "int4": {"quantize": "int4"}}  # fmt: skip


def transformers_greedy(model, tokenizer, prompt: str, n: int) -> tuple[list[int], list[float]]:
    """Greedy ids from transformers, and its top-2 margin at each step."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out, margins = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids).logits[0, -1]
            top = logits.topk(2)
            out.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            ids = torch.cat([ids, top.indices[:1][None]], dim=1)
    return out, margins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path,
                        default=Path.home() / ".cache/pocketlm-bench/smollm2/hf")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.folder)
    reference = {p: transformers_greedy(hf, tok, p, args.tokens) for p in PROMPTS}
    lms = {mode: pocketlm.load(str(args.folder), **options) for mode, options in MODES.items()}
    rows = {}
    for mode, lm in lms.items():
        same, partings, worst = 0, [], 0.0
        for prompt, (ids, margins) in reference.items():
            got = lm.generate(prompt, max_tokens=args.tokens, temperature=0).tokens
            first = next(
                (i for i, (a, b) in enumerate(zip(got, ids, strict=False)) if a != b), None
            )
            same += first is None
            if first is not None:
                partings.append(f"{first} ({margins[first]:.2f})")
            probe = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                theirs = hf(probe).logits[0]
                ours = lm.model(probe, torch.arange(probe.shape[1])[None])[0]
            worst = max(worst, float((ours - theirs).abs().max()))
        rows[mode] = {"identical": same, "partings": partings, "max_logit_diff": worst,
                      "speed": 0.0}  # fmt: skip
        print(mode, rows[mode], flush=True)  # a slow machine's run still leaves its rows
    for _ in range(args.rounds):
        for mode, lm in lms.items():
            t = time.perf_counter()
            out = lm.generate(
                PROMPTS[0], max_tokens=128, temperature=0, logit_bias={0: -100, 1: -100, 2: -100}
            )
            speed = out.stats.tokens_per_second
            rows[mode]["speed"] = max(rows[mode]["speed"], speed)
            rows[mode]["wall"] = time.perf_counter() - t
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    lines = [
        f"# HF default mode: pocketlm beside transformers fp32 ({stamp} UTC)",
        "",
        f"{args.folder}, {args.threads} threads, {len(PROMPTS)} prompts x {args.tokens} greedy "
        f"tokens, decode speed best of {args.rounds} interleaved rounds (128 tokens), load "
        f"average {' '.join(load)}.",
        "",
        "| mode | greedy identical | first parting: token (transformers' top-2 margin) | "
        "max logit diff | decode tok/s |",
        "|---|---|---|---|---|",
    ]
    for mode, row in rows.items():
        lines.append(
            f"| {mode} | {row['identical']}/{len(PROMPTS)} | {', '.join(row['partings']) or '-'}"
            f" | {row['max_logit_diff']:.2e} | {row['speed']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    results = Path(__file__).with_name("results")
    (results / f"default_modes-{stamp}.md").write_text(text)
    (results / f"default_modes-{stamp}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
