"""KV memory that grows with use: decode speed and server memory before and after, in one run.

`compare` (the default) takes two source trees -- by default a `git worktree` of 710fb18
(the preallocated cache) made in a temporary folder, and this tree -- and, round by round,
alternating which goes first, runs each in subprocesses with PYTHONPATH at its `src`:
  - decode tok/s at batch 1: `pocketlm.load()` (the embedded SmolLM2-135M), 128 greedy
    tokens after a 32-token prompt (EOS suppressed), best of 3 after a warm-up;
  - `pocketlm serve --max-batch 16`: the server's RSS right after it says it is serving
    (before any request), aggregate tok/s of 1 and then 16 concurrent streaming clients
    (128 tokens each, after one short warm-up request), and its RSS and peak RSS after.
Speeds are the best round (a shared machine's load hits both trees alike), memory the
largest. `attention` answers the block-table question: one attention step of a decode
(write the new key/value, attend over the held ones) with the cache contiguous per row,
against pages gathered into one tensor first (as PyTorch's attention needs on a CPU), for
SmolLM2-135M and GPT-2 small shapes; and the cost of one growth of a contiguous row
against its block size. Results go to benchmarks/results/kv_memory-*.{md,json}.

    python benchmarks/kv_memory.py                          # 710fb18 against this tree
    python benchmarks/kv_memory.py --before DIR_OR_REV --after DIR --rounds 3
    python benchmarks/kv_memory.py attention
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BEFORE = "710fb18"  # the last commit with the cache preallocated for the whole window
PROMPT_TOKENS, NEW_TOKENS = 32, 128

# -- the block-table question -------------------------------------------------------------

# name -> (layers, query heads, key/value heads, head dim)
SHAPES = {"SmolLM2-135M": (30, 9, 3, 64), "GPT-2 small": (12, 12, 12, 64)}


def _best_seconds(fn, *, budget: float = 0.15) -> float:  # noqa: ANN001
    """Seconds per call of `fn`: calls for about `budget` seconds, the best tenth's mean."""
    fn()
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < budget or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    fastest = times[: max(1, len(times) // 10)]
    return sum(fastest) / len(fastest)


def attention_steps(shape: tuple, *, rows: int, tokens: int, page: int | None):  # noqa: ANN201
    """One layer's decode-step attention over `tokens` held slots per row: contiguous
    (`page` None: a strided view of the row's storage) or paged (pages gathered first)."""
    import torch
    import torch.nn.functional as F

    _, hq, hk, d = shape
    q = torch.randn(rows, hq, 1, d)  # (B, Hq, 1, D)
    new = torch.randn(rows, hk, d)  # (B, Hk, D): this step's key (and value)
    mask = torch.ones(rows, 1, 1, tokens, dtype=torch.bool) if rows > 1 else None  # (B, 1, 1, S)
    gqa = hq != hk
    if page is None:
        capacity = -(-tokens // 256) * 256
        k, v = torch.randn(rows, hk, capacity, d), torch.randn(rows, hk, capacity, d)

        def step():  # noqa: ANN202
            k[:, :, tokens - 1], v[:, :, tokens - 1] = new, new
            return F.scaled_dot_product_attention(
                q, k[:, :, :tokens], v[:, :, :tokens], attn_mask=mask, enable_gqa=gqa
            )

        return step
    n_pages = -(-tokens // page)
    # Pages of all rows in one pool, heads first so that one row's gathered pages are
    # already (Hk, S, D): the layout that needs the fewest copies.
    k_pool, v_pool = (
        torch.randn(hk, rows * n_pages, page, d),
        torch.randn(hk, rows * n_pages, page, d),
    )
    table = torch.randperm(rows * n_pages)  # (B * pages,): row b owns table[b*n : (b+1)*n]
    last = table.view(rows, n_pages)[:, -1]

    def step():  # noqa: ANN202
        k_pool[:, last, (tokens - 1) % page] = new.transpose(0, 1)
        v_pool[:, last, (tokens - 1) % page] = new.transpose(0, 1)
        # Gather every row's pages: (Hk, B * pages, P, D) -> (B, Hk, S, D).
        k = k_pool.index_select(1, table).view(hk, rows, n_pages * page, d).transpose(0, 1)
        v = v_pool.index_select(1, table).view(hk, rows, n_pages * page, d).transpose(0, 1)
        return F.scaled_dot_product_attention(
            q, k[:, :, :tokens], v[:, :, :tokens], attn_mask=mask, enable_gqa=gqa
        )

    return step


def _cache_class():  # noqa: ANN202
    import importlib.util

    # The module alone (it imports only torch), not the package: the tree may be mid-change.
    spec = importlib.util.spec_from_file_location("cache", ROOT / "src/pocketlm/models/cache.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.KVCache


def growth_seconds(shape: tuple, *, tokens: int, block: int) -> float:
    """Seconds to grow one row's cache (every layer) from `tokens` slots by one block: a
    new allocation for each layer, filled with zeros, and the held slots copied in."""
    layers, _, hk, d = shape
    cache = _cache_class()(
        n_layers=layers, batch_size=1, max_seq_len=tokens + block, n_kv_heads=hk, head_dim=d
    )
    cache._resize(1, tokens)  # held, as if written so far
    started = time.perf_counter()
    cache._resize(1, tokens + block)
    return time.perf_counter() - started


def attention_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    cases = [
        (name, rows, tokens, page)
        for name in SHAPES
        for rows in (1, 16)
        for tokens in (200, 2000)
        for page in (None, 16, 256)
    ]
    growths = [(n, t, b) for n in SHAPES for t in (256, 2048) for b in (64, 128, 256, 512)]
    best: dict[tuple, float] = {}
    growth: dict[tuple, float] = {}
    for _ in range(args.rounds):  # interleaved: every case once a round, the best kept
        for case in cases:
            name, rows, tokens, page = case
            step = attention_steps(SHAPES[name], rows=rows, tokens=tokens, page=page)
            seconds = _best_seconds(step) * SHAPES[name][0]  # every layer, one token
            best[case] = min(best.get(case, float("inf")), seconds)
        for case in growths * 3:
            name, tokens, block = case
            seconds = growth_seconds(SHAPES[name], tokens=tokens, block=block)
            growth[case] = min(growth.get(case, float("inf")), seconds)
    write_attention(args, best, growth)


def write_attention(args: argparse.Namespace, best: dict, growth: dict) -> None:
    now = datetime.now(UTC)
    lines = [
        f"Decode-step attention, contiguous rows vs gathered pages, {now:%Y-%m-%d %H:%M} UTC, "
        f"{args.threads} threads, best of {args.rounds} interleaved rounds; ms per token "
        "(all layers: write the new key/value, attend over the held ones)",
        "",
        "| shapes | rows | tokens | contiguous | pages of 16 | pages of 256 | 16 / contiguous |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in SHAPES:
        for rows in (1, 16):
            for tokens in (200, 2000):
                c, p16, p256 = (best[(name, rows, tokens, p)] * 1e3 for p in (None, 16, 256))
                lines.append(
                    f"| {name} | {rows} | {tokens} | {c:.2f} | {p16:.2f} | {p256:.2f} | "
                    f"{p16 / c:.1f}x |"
                )
    lines += [
        "",
        "Growing one contiguous row by a block (reallocate every layer, copy what it held): "
        "ms per growth, and per token amortised over the block",
        "",
        "| shapes | held tokens | block | ms per growth | ms per token |",
        "|---|---|---|---|---|",
    ]
    for (name, tokens, block), seconds in growth.items():
        lines.append(
            f"| {name} | {tokens} | {block} | {seconds * 1e3:.1f} | {seconds * 1e3 / block:.3f} |"
        )
    stamp = f"{now:%Y%m%d-%H%M}"
    (RESULTS / f"kv_memory-attention-{stamp}.md").write_text("\n".join(lines) + "\n")
    data = {
        "date": now.isoformat(),
        "threads": args.threads,
        "rounds": args.rounds,
        "attention_ms_per_token": [
            {"shapes": n, "rows": r, "tokens": t, "page": p, "ms": s * 1e3}
            for (n, r, t, p), s in best.items()
        ],
        "growth_ms": [
            {"shapes": n, "tokens": t, "block": b, "ms": s * 1e3} for (n, t, b), s in growth.items()
        ],
    }
    (RESULTS / f"kv_memory-attention-{stamp}.json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(lines))


# -- before and after ----------------------------------------------------------------------


def decode_child(threads: int) -> None:
    """Run inside one tree (PYTHONPATH): batch-1 decode tok/s of the default model; prints
    one JSON line, with the EOS ids the server benchmark suppresses."""
    import torch

    import pocketlm

    torch.set_num_threads(threads)
    lm = pocketlm.load(offline=True)
    ids = [1000 + (7 * i) % 5000 for i in range(PROMPT_TOKENS)]  # shapes matter, not text
    bias = {int(i): -100.0 for i in lm.tokenizer.eos_ids}
    lm.generate(ids, max_tokens=8, temperature=0, logit_bias=bias)  # warm-up
    best = 0.0
    for _ in range(3):
        completion = lm.generate(ids, max_tokens=NEW_TOKENS, temperature=0, logit_bias=bias)
        stats = getattr(completion, "stats", None) or lm.last_stats
        assert stats.new_tokens == NEW_TOKENS, stats
        best = max(best, stats.tokens_per_second)
    print(json.dumps({"decode_tok_s": best, "eos_ids": sorted(bias)}))


def _env(tree: Path, threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(tree / "src"),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(threads),
    }


def measure_decode(tree: Path, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "_decode", "--threads", str(threads)],
        env=_env(tree, threads),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"decode in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} for process {pid}")


def stream_clients(url: str, *, clients: int, tokens: int, bias: dict) -> float:
    """Aggregate generated tokens per second of `clients` concurrent streaming requests
    (the clients of benchmarks/serve_concurrency.py)."""
    import openai
    from serve_concurrency import run_level  # beside this script

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=900)
    name = client.models.list().data[0].id
    total, seconds = run_level(client, name, clients=clients, tokens=tokens, bias=bias)
    return total / seconds


def measure_serve(tree: Path, threads: int, eos_ids: list[int], max_batch: int) -> dict:
    process = subprocess.Popen(
        [sys.executable, "-m", "pocketlm.cli.main", "serve", "--port", "0", "--offline"]
        + ["--max-batch", str(max_batch)],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(tree, threads),
    )
    try:
        line = process.stdout.readline()
        if not line.startswith("serving "):
            raise SystemExit(f"the server in {tree} did not start: {line!r}")
        url = line.split(" at ")[1].split()[0]
        result = {"rss_start_mb": rss_mb(process.pid)}
        bias = {str(i): -100 for i in eos_ids}
        stream_clients(url, clients=1, tokens=8, bias=bias)  # warm-up
        for clients in (1, max_batch):
            speed = stream_clients(url, clients=clients, tokens=NEW_TOKENS, bias=bias)
            result[f"serve_{clients}_tok_s"] = speed
        result["rss_after_mb"] = rss_mb(process.pid)
        result["rss_peak_mb"] = rss_mb(process.pid, "VmHWM")
        return result
    finally:
        process.terminate()
        threading.Thread(target=process.wait, daemon=True).start()


def before_tree(spec: str, stack: list) -> Path:
    """`spec` as a folder, or a git revision checked out into a temporary worktree."""
    if Path(spec).is_dir():
        return Path(spec).resolve()
    folder = Path(tempfile.mkdtemp(prefix="kv-before-")) / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), spec],
        check=True,
        capture_output=True,
    )
    stack.append(folder)
    return folder


def compare_main(args: argparse.Namespace) -> None:
    worktrees: list[Path] = []
    try:
        trees = {"before": before_tree(args.before, worktrees), "after": Path(args.after).resolve()}
        rounds: dict[str, list[dict]] = {label: [] for label in trees}
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for label in order:  # decode in both trees, then serve in both: interleaved
                rounds[label].append(measure_decode(trees[label], args.threads))
            for label in order:
                eos = rounds[label][-1]["eos_ids"]
                rounds[label][-1].update(
                    measure_serve(trees[label], args.threads, eos, args.max_batch)
                )
                print(f"round {r + 1} {label}: {rounds[label][-1]}", flush=True)
        write_compare(args, trees, rounds)
    finally:
        for folder in worktrees:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)],
                check=False,
                capture_output=True,
            )
            shutil.rmtree(folder.parent, ignore_errors=True)


def _summary(runs: list[dict], max_batch: int) -> dict:
    speeds = ["decode_tok_s", "serve_1_tok_s", f"serve_{max_batch}_tok_s"]
    memory = ["rss_start_mb", "rss_after_mb", "rss_peak_mb"]
    return {
        **{key: max(run[key] for run in runs) for key in speeds},
        **{key: max(run[key] for run in runs) for key in memory},
        "decode_tok_s_median": statistics.median(run["decode_tok_s"] for run in runs),
    }


def write_compare(args: argparse.Namespace, trees: dict, rounds: dict) -> None:
    now = datetime.now(UTC)
    n = args.max_batch
    summary = {label: _summary(runs, n) for label, runs in rounds.items()}
    commits = {label: _commit(tree) for label, tree in trees.items()}
    lines = [
        f"KV cache before ({commits['before']}) and after ({commits['after']}), SmolLM2-135M "
        f"fp32, {now:%Y-%m-%d %H:%M} UTC, {args.threads} threads, {args.rounds} interleaved "
        f"rounds (speeds: best round; memory: largest); decode: {PROMPT_TOKENS}-token prompt, "
        f"{NEW_TOKENS} greedy tokens; serve: --max-batch {n}, {NEW_TOKENS} tokens a client",
        "",
        f"| tree | decode tok/s (batch 1) | serve RSS at start MB | 1 client tok/s | "
        f"{n} clients tok/s | RSS after MB | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, s in summary.items():
        lines.append(
            f"| {label} | {s['decode_tok_s']:.1f} | {s['rss_start_mb']:.0f} | "
            f"{s['serve_1_tok_s']:.1f} | {s[f'serve_{n}_tok_s']:.1f} | "
            f"{s['rss_after_mb']:.0f} | {s['rss_peak_mb']:.0f} |"
        )
    stamp = f"{now:%Y%m%d-%H%M}"
    (RESULTS / f"kv_memory-{stamp}.md").write_text("\n".join(lines) + "\n")
    data = {
        "date": now.isoformat(),
        "threads": args.threads,
        "max_batch": n,
        "trees": {
            label: {"path": str(tree), "commit": commits[label]} for label, tree in trees.items()
        },
        "summary": summary,
        "rounds": rounds,
    }
    (RESULTS / f"kv_memory-{stamp}.json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(lines))


def _commit(tree: Path) -> str:
    """The tree's commit, with '+changes' when its files differ from it."""
    head = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return head + ("+changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "mode", nargs="?", default="compare", choices=["compare", "attention", "_decode"]
    )
    parser.add_argument(
        "--before", default=BEFORE, help=f"folder or git revision (default {BEFORE})"
    )
    parser.add_argument("--after", default=str(ROOT), help="folder (default: this tree)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--max-batch", type=int, default=16, help="server rows and clients (16)")
    args = parser.parse_args()
    if args.mode == "_decode":
        decode_child(args.threads)
    elif args.mode == "attention":
        attention_main(args)
    else:
        compare_main(args)


if __name__ == "__main__":
    main()
