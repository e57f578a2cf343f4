"""Speculative decoding's speed-up on a real model: the model alone against the same model
with a quantized copy of itself drafting (`--draft MODEL --draft-quantize int8`).

    python benchmarks/speculative.py                          # SmolLM2-135M fp32, int8 and int4 drafts
    python benchmarks/speculative.py --model gpt2 --drafts int8 --lookahead 4,8

A smaller model of the same family is the usual draft (gpt2 for gpt2-xl), but none can be
downloaded on a machine without the Hugging Face hub; a quantized copy of the model itself
is a draft that needs nothing more. Greedy decoding, 128 new tokens for each of a few
prompts, best of --repeats runs; reports tokens/s, the ratio to the model alone, how many
drafted tokens were kept, and whether the text is identical to the model alone (it must be).
Writes results/speculative-<date>.json and .md.
"""

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import pocketlm

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "Water boils at",
    "The best way to learn a language is",
]


def measure(lm: pocketlm.LM, args: argparse.Namespace) -> dict:
    """Greedy completions of every prompt: tokens/s (best run), texts, drafts kept."""
    best, texts, proposed, accepted = 0.0, [], 0, 0
    for _ in range(args.repeats):
        start, tokens, texts, proposed, accepted = time.perf_counter(), 0, [], 0, 0
        for prompt in PROMPTS:
            done = lm.generate(prompt, max_tokens=args.new_tokens, temperature=0)
            tokens += len(done.tokens)
            texts.append(done.text)
            proposed += done.stats.draft_proposed
            accepted += done.stats.draft_accepted
        best = max(best, tokens / (time.perf_counter() - start))
    return {"tok_s": best, "texts": texts, "proposed": proposed, "accepted": accepted}


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    now = datetime.now(timezone.utc)
    alone = pocketlm.load(args.model, quantize=args.quantize)
    base = measure(alone, args)
    rows = [{"draft": "none", "lookahead": 0, **base, "x": 1.0, "identical": True}]
    print(f"{args.model} ({args.quantize or 'fp32'}) alone: {base['tok_s']:.1f} tok/s")
    for kind in args.drafts:
        lm = pocketlm.load(args.model, quantize=args.quantize)
        draft = pocketlm.load(args.model, quantize=kind)  # the model's own quantized copy
        for lookahead in args.lookahead:
            lm.use_draft(draft, lookahead=lookahead)
            row = {"draft": kind, "lookahead": lookahead, **measure(lm, args)}
            row["x"] = row["tok_s"] / base["tok_s"]
            row["identical"] = row["texts"] == base["texts"]
            rows.append(row)
            print(f"  {kind} draft, lookahead {lookahead}: {row['tok_s']:.1f} tok/s "
                  f"({row['x']:.2f}x), kept {row['accepted']}/{row['proposed']} drafted, "
                  f"identical to alone: {row['identical']}")  # fmt: skip
    write(args, rows, now)
    return 0


def write(args: argparse.Namespace, rows: list[dict], now: datetime) -> None:
    stem = args.out / f"speculative-{now:%Y%m%d-%H%M}"
    args.out.mkdir(parents=True, exist_ok=True)
    title = (f"{args.model} ({args.quantize or 'fp32'}), quantized copies drafting, "
             f"{now:%Y-%m-%d %H:%M} UTC, {args.threads} threads, {args.new_tokens} new tokens x "
             f"{len(PROMPTS)} prompts, greedy")  # fmt: skip
    lines = [title, "", "| draft | lookahead | tok/s | x alone | drafted kept | identical |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        kept = f"{r['accepted']}/{r['proposed']}" if r["proposed"] else "—"
        lines.append(f"| {r['draft']} | {r['lookahead'] or '—'} | {r['tok_s']:.1f} | "
                     f"{r['x']:.2f}x | {kept} | {r['identical']} |")  # fmt: skip
    report = {"date": now.isoformat(), "model": args.model, "quantize": args.quantize,
              "threads": args.threads, "new_tokens": args.new_tokens, "rows": rows}  # fmt: skip
    for suffix, text in ((".json", json.dumps(report, indent=1)), (".md", "\n".join(lines) + "\n")):
        tmp = stem.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, stem.with_suffix(suffix))
    print(f"wrote {stem}.json and .md")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quantize", choices=["int8", "int4"], help="the model's own (default fp32)")
    p.add_argument("--drafts", type=lambda s: s.split(","), default=["int8", "int4"])
    p.add_argument("--lookahead", type=lambda s: [int(n) for n in s.split(",")], default=[4, 8])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", type=Path, default=HERE / "results")
    return p.parse_args()


if __name__ == "__main__":
    raise SystemExit(main())
