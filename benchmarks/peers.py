"""pocketlm beside its peers, in one run on one machine, on the same weights.

    python benchmarks/peers.py                       # GPT-2 small/medium/large shapes + SmolLM2
    python benchmarks/peers.py --models gpt2-small --new-tokens 64

For each model it measures, at batch 1 with greedy decoding: decode tokens/s (a 32-token
prompt, 128 new tokens), prefill tokens/s (one 512-token prompt), time to first token and
peak RSS, for
  - pocketlm: fp32, bf16, int8 (weight-only; from the Q8_0 GGUF where there is one),
    int4 (from the Q4_1 GGUF where there is one), and some of them with --compile;
  - transformers `generate`: fp32, bf16, and static cache + torch.compile (GPT-2 small);
  - llama.cpp through llama-cpp-python: the same weights as GGUF f32, f16 and q8_0
    (converted with llama.cpp's own convert_hf_to_gguf.py), or the shipped GGUF itself.
Every engine runs in a fresh subprocess (so peak RSS is its own and a crash is one row).
Each figure is also given as a ratio to transformers fp32 of the same run, beside the
bandwidth bound: measured read bandwidth / weight bytes read per token. On a shared
machine, `--rounds 3` runs every row three times round-robin and keeps the fastest.

GPT-2 shapes use random weights (speed does not depend on their values); SmolLM2 is the
embedded SmolLM2-135M-Instruct GGUF. Writes results/peers-<date>.json, a markdown table
and a PNG bar chart. Missing peers are reported as "skipped" with the reason.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
GPT2_SHAPES = {
    "gpt2-small": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
}
SMOLLM2 = "smollm2-135m"
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_1")  # q4_1: llama.cpp's quantizer on the f32 file


# --- preparing the weights ------------------------------------------------------------


def gpt2_folder(workdir: Path, name: str) -> Path:
    """A random GPT-2 of the named shape in HF layout, with the GPT-2 vocabulary."""
    folder = workdir / name
    if (folder / "model.safetensors").is_file():
        return folder
    import shutil
    from importlib import resources

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2_SHAPES[name], n_positions=1024, n_ctx=1024))
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_ctx"] = 1024  # convert_hf_to_gguf.py reads the original key
    (folder / "config.json").write_text(json.dumps(config))
    for file in ("vocab.json", "merges.txt"):
        with resources.as_file(resources.files("pocketlm") / "data" / "gpt2" / file) as src:
            shutil.copy(src, folder / file)
    return folder


def gguf_copy(folder: Path, kind: str, convert: Path | None) -> tuple[Path | None, str]:
    """(the folder's weights as GGUF `kind`, "") or (None, why not)."""
    out = folder.with_name(f"{folder.name}-{kind}.gguf")
    if out.is_file():
        return out, ""
    if kind == "q4_1":
        return _llama_quantize(folder, out)
    if convert is None or not convert.is_file():
        return None, "skipped: no convert_hf_to_gguf.py (pass --convert)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    gguf_py = convert.parent / "gguf-py"
    if gguf_py.is_dir():  # the converter wants its own gguf-py, newer than PyPI's at times
        env["PYTHONPATH"] = str(gguf_py)
    command = [sys.executable, str(convert), str(folder), "--outtype", kind, "--outfile", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None, f"skipped: conversion failed ({done.stderr.strip().splitlines()[-1:]})"
    return out, ""


def _llama_quantize(folder: Path, out: Path) -> tuple[Path | None, str]:
    """The folder's f32 GGUF quantized to Q4_1 by llama.cpp itself (as `llama-quantize`)."""
    if not _importable("llama_cpp"):
        return None, "skipped: llama-cpp-python is not installed (it quantizes to q4_1)"
    source = folder.with_name(f"{folder.name}-f32.gguf")
    if not source.is_file():
        return None, "skipped: needs the f32 GGUF first"
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1
    partial = out.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
        return None, "skipped: llama.cpp could not quantize to q4_1"
    partial.rename(out)
    return out, ""


def smollm2_path() -> Path:
    from pocketlm.weights.sources import resolve

    return resolve(SMOLLM2, offline=True)


# --- workers (each in its own process) -------------------------------------------------


def prompt_ids(n: int) -> list[int]:
    return [1000 + (7 * i) % 5000 for i in range(n)]


def work_pocketlm(args: argparse.Namespace) -> dict:
    import pocketlm
    from pocketlm.generate.benchmark import measure

    dtype = "bf16" if args.mode == "bf16" else "fp32"
    compile = args.mode.endswith("+compile")
    base = args.mode.removesuffix("+compile")
    quantize = base if base in ("int8", "int4") else None
    started = time.perf_counter()
    lm = pocketlm.load(args.path, dtype=dtype, quantize=quantize, offline=True)
    load_s = time.perf_counter() - started
    m = measure(lm.model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                prefill_tokens=args.prefill_tokens, compile=compile)  # fmt: skip
    return {**m.as_dict(), "load_s": load_s}


def work_transformers(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.mode == "bf16" else torch.float32
    path = Path(args.path)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(
        path.parent if kwargs else path, dtype=dtype, **kwargs
    ).eval()
    compile_s = 0.0
    if args.mode == "static-compile":
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, dynamic=False)
    ids = torch.tensor([prompt_ids(args.prompt_tokens)])
    options = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def generate(n: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **options)
        return time.perf_counter() - started

    compile_s = generate(4)  # warm-up (and the compile, when compiling)
    ttft = min(generate(1) for _ in range(3))
    total = min(generate(args.new_tokens) for _ in range(2))
    long = torch.tensor([prompt_ids(args.prefill_tokens)])
    prefill = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        with torch.inference_mode():
            model(long)
        prefill = min(prefill, time.perf_counter() - started)
    return {"decode_tok_s": (args.new_tokens - 1) / (total - ttft), "prefill_tok_s": args.prefill_tokens / prefill,
            "ttft_ms": ttft * 1000, "peak_rss_mb": _peak_rss(), "warmup_s": compile_s}  # fmt: skip


def work_llama_cpp(args: argparse.Namespace) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=args.path, n_ctx=1024, n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)  # fmt: skip
    ids = prompt_ids(args.prompt_tokens)

    def argmax() -> int:
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    llm.reset()
    llm.eval(ids[:8])  # warm-up
    ttft, decode = float("inf"), float("inf")
    for _ in range(3):
        llm.reset()
        started = time.perf_counter()
        llm.eval(ids)
        token = argmax()
        first = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            llm.eval([token])
            token = argmax()
        ttft, decode = min(ttft, first - started), min(decode, time.perf_counter() - first)
    prefill = float("inf")
    for _ in range(3):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt_ids(args.prefill_tokens))
        prefill = min(prefill, time.perf_counter() - started)
    return {"decode_tok_s": (args.new_tokens - 1) / decode, "prefill_tok_s": args.prefill_tokens / prefill,
            "ttft_ms": ttft * 1000, "peak_rss_mb": _peak_rss()}  # fmt: skip


def _peak_rss() -> float:
    from pocketlm.generate.benchmark import peak_rss_mb

    return peak_rss_mb()


WORKERS = {
    "pocketlm": work_pocketlm,
    "transformers": work_transformers,
    "llama.cpp": work_llama_cpp,
}


def run_worker(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    result = WORKERS[args.worker](args)
    print("RESULT " + json.dumps(result))
    return 0


# --- the run --------------------------------------------------------------------------


def plan(
    model: str, folder: Path, args: argparse.Namespace
) -> list[tuple[str, str, Path | None, str]]:
    """(engine, mode, weights, why skipped) rows for one model."""
    have_llama = _importable("llama_cpp")
    no_llama = "skipped: llama-cpp-python is not installed (pip install llama-cpp-python)"
    if model == SMOLLM2:
        rows = [("pocketlm", "fp32", folder, ""), ("pocketlm", "bf16", folder, ""),
                ("pocketlm", "int8", folder, ""), ("pocketlm", "int8+compile", folder, ""),
                ("pocketlm", "int4 (same file)", folder, ""),
                ("pocketlm", "int4+compile (same file)", folder, ""),
                ("transformers", "fp32", folder, ""),
                ("transformers", "bf16", folder, "")]  # fmt: skip
        return [
            *rows,
            (
                "llama.cpp",
                "q4_1 (same file)",
                folder if have_llama else None,
                "" if have_llama else no_llama,
            ),
        ]
    ggufs = {kind: gguf_copy(folder, kind, args.convert) for kind in GGUF_TYPES}
    (q8_path, _), (q4_path, _) = ggufs["q8_0"], ggufs["q4_1"]
    rows = [("pocketlm", "fp32", folder, ""), ("pocketlm", "bf16", folder, ""),
            ("pocketlm", "int8", folder, "")]  # fmt: skip
    if q8_path is not None:
        rows.append(("pocketlm", "int8 (from q8_0 gguf)", q8_path, ""))
    rows.append(("pocketlm", "int4", folder, ""))
    if q4_path is not None:
        rows.append(("pocketlm", "int4 (from q4_1 gguf)", q4_path, ""))
    if model in args.compiled:
        rows += [("pocketlm", "fp32+compile", folder, ""), ("pocketlm", "int8+compile", folder, "")]
        if q4_path is not None:
            rows.append(("pocketlm", "int4+compile (from q4_1 gguf)", q4_path, ""))
    rows += [("transformers", "fp32", folder, ""), ("transformers", "bf16", folder, "")]
    if model in args.hf_compile:
        rows.append(("transformers", "static-compile", folder, ""))
    for kind, (path, why) in ggufs.items():
        rows.append(
            (
                "llama.cpp",
                kind,
                path if have_llama else None,
                why or ("" if have_llama else no_llama),
            )
        )
    return rows


def _importable(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None


def spawn(engine: str, mode: str, path: Path, args: argparse.Namespace) -> dict:
    mode_arg = mode.split(" ")[0]  # "int8 (from q8_0 gguf)" runs as int8 on that file
    command = [sys.executable, __file__, "--worker", engine, "--mode", mode_arg, "--path", str(path),
               "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
               "--prompt-tokens", str(args.prompt_tokens), "--prefill-tokens", str(args.prefill_tokens)]  # fmt: skip
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"status": f"failed: over {args.timeout} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {"status": "ok", **json.loads(line[7:])}
    tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return {"status": f"failed: {tail[:160]}"}


def run_model(model: str, args: argparse.Namespace, bandwidth: float) -> list[dict]:
    """Every row of the plan, `--rounds` times round-robin (so a spell of load from other
    jobs on the machine hits every engine alike), keeping each row's fastest decode."""
    folder = smollm2_path() if model == SMOLLM2 else gpt2_folder(args.workdir, model)
    steps = plan(model, folder, args)
    rows: list[dict] = [{} for _ in steps]
    for round_ in range(args.rounds):
        for i, (engine, mode, path, why) in enumerate(steps):
            print(f"  {model:13} {engine:12} {mode:22}", end=" ", flush=True)
            result = spawn(engine, mode, path, args) if path is not None else {"status": why}
            row = {"model": model, "engine": engine, "mode": mode, **result}
            if "bytes_per_token" in row:
                row["bound_tok_s"] = bandwidth * 1e9 / row["bytes_per_token"]
                row["of_bound"] = row["decode_tok_s"] / row["bound_tok_s"]
            ok = row["status"] == "ok"
            print(f"{row['decode_tok_s']:7.1f} tok/s" if ok else row["status"], flush=True)
            if round_ == 0 or (ok and row["decode_tok_s"] > rows[i].get("decode_tok_s", 0)):
                rows[i] = row
    base = next(
        (
            r
            for r in rows
            if r["engine"] == "transformers" and r["mode"] == "fp32" and r["status"] == "ok"
        ),
        None,
    )
    for row in rows:
        if base is not None and row["status"] == "ok":
            row["x_decode"] = row["decode_tok_s"] / base["decode_tok_s"]
            row["x_prefill"] = row["prefill_tok_s"] / base["prefill_tok_s"]
            row["x_ttft"] = base["ttft_ms"] / row["ttft_ms"]  # > 1: sooner than transformers
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def table(rows: list[dict]) -> str:
    head = ("| model | engine | mode | decode tok/s | x tf | prefill 512 tok/s | x tf | TTFT ms | "
            "peak RSS MB | bound tok/s | of bound |\n|" + "---|" * 11)  # fmt: skip
    lines = [head]
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['model']} | {r['engine']} | {r['mode']} | {r['status']} |" + " |" * 7
            )
            continue
        bound = f"{r['bound_tok_s']:.0f} | {r['of_bound']:.0%}" if "bound_tok_s" in r else " | "
        lines.append(
            f"| {r['model']} | {r['engine']} | {r['mode']} | {r['decode_tok_s']:.1f} | {r.get('x_decode', 0):.2f} | "
            f"{r['prefill_tok_s']:.0f} | {r.get('x_prefill', 0):.2f} | {r['ttft_ms']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {bound} |"
        )
    return "\n".join(lines)


def chart(rows: list[dict], file: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 2.6 * len(models) + 1), squeeze=False)
    for ax, model in zip(axes[:, 0], models, strict=True):
        ok = [r for r in rows if r["model"] == model and r["status"] == "ok"]
        labels = [f"{r['engine']} {r['mode']}" for r in ok]
        colors = ["tab:green" if r["engine"] == "pocketlm" else "tab:blue" if r["engine"] == "transformers"
                  else "tab:orange" for r in ok]  # fmt: skip
        bars = ax.barh(labels, [r["decode_tok_s"] for r in ok], color=colors)
        ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{model}: decode tokens/s (batch 1)", fontsize=10)
        ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(file, dpi=110)


def main() -> int:
    args = parse_args()
    if args.worker:
        return run_worker(args)
    import torch

    from pocketlm.generate.benchmark import memory_bandwidth

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    bandwidth = memory_bandwidth()
    now = datetime.now(timezone.utc)
    title = f"pocketlm vs peers, {now:%Y-%m-%d %H:%M} UTC, {machine()}, {args.threads} threads"
    if args.rounds > 1:
        title += f", best of {args.rounds} rounds"
    print(f"{title}\nmeasured read bandwidth: {bandwidth:.1f} GB/s")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"peers-{now:%Y%m%d-%H%M}"
    rows = []
    for model in args.models:
        rows += run_model(model, args, bandwidth)
        write_results(
            stem, rows, args=args, title=title, bandwidth=bandwidth, now=now
        )  # after each model
    print(f"\n{stem.with_suffix('.md').read_text()}\nwrote {stem}.json, .md and .png")
    return 0


def write_results(
    stem: Path,
    rows: list[dict],
    *,
    args: argparse.Namespace,
    title: str,
    bandwidth: float,
    now: datetime,
) -> None:
    report = {"date": now.isoformat(), "machine": machine(), "threads": args.threads, "rounds": args.rounds,
              "bandwidth_gb_s": bandwidth, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "prefill_tokens": args.prefill_tokens, "rows": rows}  # fmt: skip
    _atomic_write(stem.with_suffix(".json"), json.dumps(report, indent=1))
    text = f"{title}\n\nmeasured read bandwidth {bandwidth:.1f} GB/s; x tf = ratio to transformers fp32\n\n{table(rows)}\n"
    _atomic_write(stem.with_suffix(".md"), text)
    chart(rows, stem.with_suffix(".png"), title)


def _atomic_write(file: Path, text: str) -> None:
    tmp = file.with_suffix(file.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, file)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=[*GPT2_SHAPES, SMOLLM2])
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument(
        "--hf-compile",
        type=lambda s: s.split(","),
        default=["gpt2-small"],
        help="models to also run with transformers' static cache + torch.compile",
    )
    p.add_argument(
        "--compiled",
        type=lambda s: s.split(","),
        default=["gpt2-small"],
        help="GPT-2 shapes to also run with pocketlm's compiled decode step (--compile)",
    )
    p.add_argument(
        "--convert",
        type=Path,
        default=os.environ.get("LLAMA_CPP_CONVERT"),
        help="llama.cpp's convert_hf_to_gguf.py (or $LLAMA_CPP_CONVERT)",
    )
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "pocketlm-bench")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--timeout", type=int, default=900, help="seconds per engine and model")
    p.add_argument(
        "--rounds", type=int, default=1, help="runs of every row, round-robin; the fastest is kept"
    )
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.convert is not None:
        args.convert = Path(args.convert)
    return args


if __name__ == "__main__":
    sys.exit(main())
