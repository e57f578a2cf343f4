"""GGUF fidelity (issue 14): the perplexity pocketlm gets from real GGUF files of every
common quantization type, beside llama.cpp and transformers on the very same files, the
same token windows and the same scored positions.

The files. There is no HF copy of SmolLM2-135M on this machine and no network, so the HF
folder is made from the embedded default model (SmolLM2-135M-Instruct, Q4_1 with a Q8_0
embedding): transformers loads it with `gguf_file=` (which dequantizes exactly, the block
values times their scales) and `save_pretrained` writes it as fp32 safetensors. llama.cpp's
own convert_hf_to_gguf.py (the vendored copy tests/vendor.py fetches, run with its own
gguf-py as tests/convert.py does) turns that folder into an F32 GGUF, and llama.cpp's
`llama-quantize` makes Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M, Q2_K and IQ4_XS from it.
SmolLM2's 576-wide rows are not a multiple of 256, so for the K- and IQ-types llama-quantize
falls back to a 32-block type for those tensors (its log is kept beside each file and the
tensor types are counted in the report). Everything is made once, under
~/.cache/pocketlm-bench/smollm2/, and reused. The F32 file (every engine should agree on
it) and the shipped Q4_1 file itself are measured too; since the F32 is the Q4_1 file
dequantized, their transformers and pocketlm-fp32 perplexities are equal.

The text: five chapters of the Python Language Reference as the venv's Python ships them
(`pydoc_data.topics`: execmodel, naming, import, exceptions, customization), written once
to the cache (its sha256 is in the report). Tokens: the ids llama-perplexity itself scores
(read from its --kl-divergence-base file), checked equal to pocketlm's tokenizer's; all
engines score these ids.

What is scored: exactly what `llama-perplexity -c 512 -b 512` scores
(tools/perplexity/perplexity.cpp, perplexity()): the ids cut into non-overlapping windows
of 512 (the first `--windows` of them); in each window the logits at positions 256..510
predict the tokens at 257..511 (255 per window; position 511's logits are unused); if the
file's tokenizer asks for BOS (`tokenizer.ggml.add_bos_token`) the window's first token is
replaced by BOS. PPL = exp(mean NLL). Engines: (a) `llama-perplexity -m FILE -f TEXT -c 512
-b 512 -t THREADS --chunks WINDOWS` (F16 KV cache, activations quantized as ggml does on
CPU); (b) transformers `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`, fp32,
one forward per window; (c) pocketlm `pocketlm.load(FILE)` with no options (whatever the
default GGUF path is; the report names the class of layer 0's mlp.down_proj), one
`lm.model(tokens, positions)` per window, and (d) `pocketlm.load(FILE, dtype="fp32")`.

    python benchmarks/gguf_fidelity.py                      # all types, 8 windows
    python benchmarks/gguf_fidelity.py --types Q8_0,Q4_K_M --windows 2   # a quick look

About 4 minutes a file on 2 free cores (transformers' GGUF dequantization is most of it).

Needs llama.cpp's tools built in ~/.cache/pocketlm-bench/llama-build/bin (--llama-bin).
Writes results/gguf_fidelity-<UTC stamp>.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import re
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import pocketlm  # noqa: E402
from pocketlm.weights.gguf import read_gguf  # noqa: E402
from pocketlm.weights.sources import resolve  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BENCH = Path.home() / ".cache" / "pocketlm-bench"
LLAMA_SRC = (
    Path.home()
    / ".cache/pocketlm-tests/unpacked/llama.cpp/llama_cpp_python-0.3.36/vendor/llama.cpp"
)
TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_XS")
TOPICS = ("execmodel", "naming", "import", "exceptions", "customization")
CONTEXT = 512  # llama-perplexity's -c and -b
FIRST = CONTEXT // 2  # perplexity.cpp's `first`: logits from here on are scored
STEM = "SmolLM2-135M-Instruct"
ENGINES = ("llama.cpp", "transformers", "pocketlm", "pocketlm fp32")

Forward = Callable[[list[int]], torch.Tensor]  # one window's ids -> its logits (T, V)


# -- the files ---------------------------------------------------------------------------


def run_logged(command: list[str], log: Path, *, env: dict | None = None) -> None:
    """Run a command with its output in `log` (a file, not a pipe that could fill)."""
    with open(log, "w") as out:
        rc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{command[0]} failed ({rc}); the end of {log}:\n{tail}")


def hf_folder(cache: Path, shipped: Path) -> Path:
    """An HF folder of SmolLM2-135M-Instruct: the shipped GGUF dequantized by transformers."""
    folder = cache / "hf"
    if (folder / "model.safetensors").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        shipped.parent, gguf_file=shipped.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(shipped.parent, gguf_file=shipped.name)
    # transformers refuses to save a model it loaded "quantized with gguf", though the
    # weights it holds are plain fp32: forget the quantizer so save_pretrained writes them.
    model.hf_quantizer = None
    del model.config.quantization_config
    partial = cache / "hf.partial"
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


def f32_gguf(cache: Path, folder: Path) -> Path:
    """The folder as an F32 GGUF, by llama.cpp's convert_hf_to_gguf.py."""
    out = cache / f"{STEM}-F32.gguf"
    if out.is_file():
        return out
    partial = out.with_suffix(".partial")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py
    script = LLAMA_SRC / "convert_hf_to_gguf.py"
    command = [sys.executable, str(script), str(folder), "--outfile", str(partial),
               "--outtype", "f32"]  # fmt: skip
    run_logged(command, out.with_suffix(".log"), env=env)
    partial.rename(out)
    return out


def quantized(cache: Path, source: Path, qtype: str, bin_dir: Path) -> Path:
    """`source` requantized to `qtype` by llama-quantize (its log beside the file)."""
    out = cache / f"{STEM}-{qtype}.gguf"
    if out.is_file():
        return out
    partial = out.with_suffix(".partial")
    log = out.with_suffix(".quantize.log")
    run_logged([str(bin_dir / "llama-quantize"), str(source), str(partial), qtype, "2"], log)
    partial.rename(out)
    return out


def fallbacks(path: Path) -> dict[str, int]:
    """llama-quantize's fallbacks for a file, "Q4_K -> Q5_0": count (from its log)."""
    log = path.with_suffix(".quantize.log")
    if not log.is_file():
        return {}
    pattern = re.compile(r"required for type\s+(\S+)\).*falling back to\s+(\S+)")
    found = pattern.findall(log.read_text(errors="replace"))
    return dict(Counter(f"{want} -> {got}" for want, got in found))


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type the file holds."""
    return dict(Counter(t.ggml_type for t in read_gguf(path).tensors.values()))


def last_line(path: Path) -> str:
    return path.read_text(errors="replace").rstrip().rpartition("\n")[2]


def wait_for_build(bin_dir: Path, *, timeout_s: float = 3600) -> None:
    """Wait until the llama.cpp build logging to `build.log` (beside llama-build/) has
    ended (its last line "done <rc>"), then check the tools this script runs are there."""
    log = bin_dir.parent.parent / "build.log"
    deadline = time.monotonic() + timeout_s
    while log.is_file() and not last_line(log).startswith("done"):
        if time.monotonic() > deadline:
            raise SystemExit(f"the llama.cpp build has not finished (see {log})")
        time.sleep(20)
    missing = [t for t in ("llama-quantize", "llama-perplexity") if not (bin_dir / t).is_file()]
    if missing:
        raise SystemExit(f"llama.cpp tools missing from {bin_dir}: {', '.join(missing)}")


# -- the text and its windows --------------------------------------------------------------


def text_file(cache: Path) -> Path:
    """The Python Language Reference chapters, as one file with no trailing newline
    (llama-perplexity's -f drops one; llama-tokenize keeps it)."""
    import pydoc_data.topics

    path = cache / "python-reference.txt"
    if not path.is_file():
        text = "\n\n".join(pydoc_data.topics.topics[t].strip() for t in TOPICS)
        path.write_text(text, encoding="utf-8")
    return path


def llama_ids(model: Path, text: Path, n: int, bin_dir: Path, threads: int) -> list[int]:
    """The ids llama-perplexity scores (its first n windows): the build has no
    llama-tokenize, so they are read from the head of the logits file that
    `--kl-divergence-base` writes ("_logits_", n_ctx, n_vocab, n_chunk, then the int32
    ids of every chunk), which is then deleted (about 50 MB a window)."""
    base = text.with_suffix(".logits")
    command = [str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text),
               "-c", str(CONTEXT), "-b", str(CONTEXT), "-t", str(threads), "--chunks", str(n),
               "--kl-divergence-base", str(base)]  # fmt: skip
    try:
        subprocess.run(command, capture_output=True, check=True)
        with open(base, "rb") as f:
            magic, (n_ctx, _, n_chunk) = f.read(8), struct.unpack("<3i", f.read(12))
            if magic != b"_logits_" or n_ctx != CONTEXT or n_chunk != n:
                raise SystemExit(f"unexpected logits file head {magic!r} {n_ctx} {n_chunk}")
            return list(struct.unpack(f"<{n_ctx * n_chunk}i", f.read(4 * n_ctx * n_chunk)))
    finally:
        base.unlink(missing_ok=True)


def windows_of(ids: Sequence[int], n: int) -> list[list[int]]:
    if len(ids) < n * CONTEXT:
        raise SystemExit(f"the text has {len(ids)} tokens; {n} windows need {n * CONTEXT}")
    return [list(ids[i * CONTEXT : (i + 1) * CONTEXT]) for i in range(n)]


def bos_of(path: Path) -> int | None:
    """The BOS id llama-perplexity puts first in each window, or None (add_bos false)."""
    meta = read_gguf(path).metadata
    return meta["tokenizer.ggml.bos_token_id"] if meta.get("tokenizer.ggml.add_bos_token") else None


# -- the engines ---------------------------------------------------------------------------


def window_perplexity(forward: Forward, windows: list[list[int]], bos: int | None) -> float:
    """perplexity.cpp's quantity: logits at FIRST..CONTEXT-2 predict tokens FIRST+1..end."""
    nll, count = 0.0, 0
    for window in windows:
        fed = [bos, *window[1:]] if bos is not None else window
        with torch.inference_mode():
            logits = forward(fed)  # (T, V)
        rows = logits[FIRST : CONTEXT - 1].double()  # (255, V)
        targets = torch.tensor(window[FIRST + 1 :])  # (255,)
        logp = torch.log_softmax(rows, dim=-1).gather(-1, targets[:, None])[:, 0]
        nll -= logp.sum().item()
        count += len(targets)
    return math.exp(nll / count)


def llama_cpp(path: Path, text: Path, n: int, bin_dir: Path, threads: int) -> dict:
    command = [str(bin_dir / "llama-perplexity"), "-m", str(path), "-f", str(text),
               "-c", str(CONTEXT), "-b", str(CONTEXT), "-t", str(threads),
               "--chunks", str(n)]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = done.stdout + done.stderr
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", log)
    if done.returncode != 0 or found is None:
        return {"error": f"llama-perplexity failed ({done.returncode}): {log[-500:]}"}
    return {"ppl": float(found.group(1)), "chunks": int(chunks.group(1)) if chunks else None,
            "seconds": seconds}  # fmt: skip


def transformers_engine(path: Path, windows: list[list[int]], bos: int | None) -> dict:
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        ).eval()
    except Exception as error:  # noqa: BLE001 - a refused type is a result, recorded
        return {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    loaded = time.perf_counter()

    def forward(ids: list[int]) -> torch.Tensor:
        return model(torch.tensor([ids])).logits[0]

    ppl = window_perplexity(forward, windows, bos)
    return {"ppl": ppl, "load_s": loaded - started, "seconds": time.perf_counter() - loaded}


def pocketlm_engine(path: Path, windows: list[list[int]], bos: int | None, **options) -> dict:
    started = time.perf_counter()
    try:
        lm = pocketlm.load(path, **options)
    except Exception as error:  # noqa: BLE001 - a refused type is a result, recorded
        return {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    loaded = time.perf_counter()
    mlp = lm.model.model.layers[0].mlp
    layer = type(getattr(mlp, "down_proj", mlp))
    device = next(lm.model.parameters()).device

    def forward(ids: list[int]) -> torch.Tensor:
        tokens = torch.tensor([ids], device=device)  # (1, T)
        positions = torch.arange(len(ids), device=device)[None]  # (1, T)
        return lm.model(tokens, positions)[0].float().cpu()

    ppl = window_perplexity(forward, windows, bos)
    dtype = str(next(lm.model.parameters()).dtype)
    return {"ppl": ppl, "load_s": loaded - started, "seconds": time.perf_counter() - loaded,
            "down_proj": f"{layer.__module__}.{layer.__qualname__}", "dtype": dtype}  # fmt: skip


def diff(a: dict, b: dict) -> float | None:
    """(a - b) / b in percent, or None when either engine has no number."""
    if "ppl" not in a or "ppl" not in b:
        return None
    return 100 * (a["ppl"] - b["ppl"]) / b["ppl"]


def measure(label: str, path: Path, text: Path, windows: list[list[int]], args) -> dict:
    bos = bos_of(path)
    print(f"[{label}] {path.name}", flush=True)
    row = {"type": label, "file": str(path), "mb": path.stat().st_size / 2**20,
           "bos": bos, "tensor_types": tensor_types(path), "fallbacks": fallbacks(path)}  # fmt: skip
    row["llama.cpp"] = llama_cpp(path, text, len(windows), args.llama_bin, args.threads)
    row["transformers"] = transformers_engine(path, windows, bos)
    row["pocketlm"] = pocketlm_engine(path, windows, bos)
    row["pocketlm fp32"] = pocketlm_engine(path, windows, bos, dtype="fp32")
    gc.collect()  # the models went with their engines' frames
    for engine in ("pocketlm", "pocketlm fp32"):
        row[f"{engine} vs transformers %"] = diff(row[engine], row["transformers"])
        row[f"{engine} vs llama.cpp %"] = diff(row[engine], row["llama.cpp"])
    row["transformers vs llama.cpp %"] = diff(row["transformers"], row["llama.cpp"])
    brief = {k: (v.get("ppl", v.get("error")) if isinstance(v, dict) else v)
             for k, v in row.items() if k not in ("file", "tensor_types", "fallbacks")}  # fmt: skip
    print(json.dumps(brief, default=str), flush=True)
    return row


# -- the report ----------------------------------------------------------------------------


def _ppl(cell: dict) -> str:
    return f"{cell['ppl']:.4f}" if "ppl" in cell else "refused"


def _layer(cell: dict) -> str:
    return cell.get("down_proj", "—").rpartition(".")[2]


def _pct(value: float | None, target: float) -> str:
    if value is None:
        return "—"
    return f"{value:+.3f}" + ("" if abs(value) <= target else " ✗")


def markdown(report: dict) -> str:
    rows = report["rows"]
    lines = [
        f"# GGUF fidelity, {report['stamp']} UTC, {report['threads']} threads",
        "",
        f"`{report['command']}`",
        "",
        f"SmolLM2-135M-Instruct; text: {report['text']['source']} "
        f"({report['text']['chars']} chars, {report['text']['tokens']} tokens, "
        f"sha256 {report['text']['sha256'][:12]}; pocketlm's tokenizer gives the same ids: "
        f"{report['text']['pocketlm_ids_equal']}). {report['windows']} windows of {CONTEXT}, "
        f"each scoring its last {CONTEXT - FIRST - 1} tokens as `llama-perplexity -c 512 "
        f"-b 512` does ({report['windows'] * (CONTEXT - FIRST - 1)} tokens in all). "
        "Perplexity; % = (pocketlm - other) / other; ✗ past the target "
        "(0.5% of transformers, 1% of llama.cpp).",
        "",
        "pocketlm: `pocketlm.load(FILE)`, no options (layer: the class of layer 0's "
        'mlp.down_proj it gave); pocketlm fp32: `pocketlm.load(FILE, dtype="fp32")` '
        f"(layer: {', '.join(report['pocketlm_fp32_layers'])}).",
        "",
        "| type | MB | llama.cpp | transformers | pocketlm | layer | pocketlm fp32 "
        "| pocketlm vs tf % | pocketlm vs llama.cpp % | fp32 vs tf % | fp32 vs llama.cpp % "
        "| tf vs llama.cpp % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['type']} | {r['mb']:.0f} | {_ppl(r['llama.cpp'])} | "
            f"{_ppl(r['transformers'])} | {_ppl(r['pocketlm'])} | {_layer(r['pocketlm'])} | "
            f"{_ppl(r['pocketlm fp32'])} | "
            f"{_pct(r['pocketlm vs transformers %'], 0.5)} | "
            f"{_pct(r['pocketlm vs llama.cpp %'], 1.0)} | "
            f"{_pct(r['pocketlm fp32 vs transformers %'], 0.5)} | "
            f"{_pct(r['pocketlm fp32 vs llama.cpp %'], 1.0)} | "
            f"{_pct(r['transformers vs llama.cpp %'], 1.0)} |"
        )
    lines += ["", "Tensor types per file (llama-quantize's fallbacks for 576-wide rows):", ""]
    for r in rows:
        types = ", ".join(f"{k} {v}" for k, v in sorted(r["tensor_types"].items()))
        falls = ", ".join(f"{k} ×{v}" for k, v in r["fallbacks"].items()) or "none"
        lines.append(f"- {r['type']}: {types}; fallbacks: {falls}")
    errors = [(r["type"], e, r[e]["error"]) for r in rows for e in ENGINES if "error" in r[e]]
    if errors:
        lines += ["", "Refusals:", ""]
        lines += [f"- {t}, {e}: `{msg}`" for t, e, msg in errors]
    return "\n".join(lines) + "\n"


def layers(rows: list[dict], engine: str) -> list[str]:
    """The distinct down_proj classes an engine's loads gave, in row order."""
    found = (r[engine]["down_proj"] for r in rows if "down_proj" in r[engine])
    return list(dict.fromkeys(found))


# -- main ----------------------------------------------------------------------------------


def prepare(args) -> list[tuple[str, Path]]:
    """The (label, file) pairs to measure, made first where missing."""
    shipped = resolve(None, offline=True)
    f32 = f32_gguf(args.cache, hf_folder(args.cache, shipped))
    files = [("F32", f32)] if "F32" in args.types else []
    for qtype in (t for t in args.types if t in TYPES):
        files.append((qtype, quantized(args.cache, f32, qtype, args.llama_bin)))
    if "Q4_1" in args.types:
        files.append(("Q4_1 (shipped)", shipped))
    return files


def text_report(text: Path, ids: list[int], lm_ids: list[int]) -> dict:
    """Where the text is from, and whether pocketlm's tokenizer gives llama.cpp's ids
    (compared over the windows' length: llama.cpp's file holds only those)."""
    raw = text.read_bytes()
    return {"source": "Python " + sys.version.split()[0] + " Language Reference, "
            "pydoc_data.topics[" + ", ".join(TOPICS) + "]", "file": str(text),
            "chars": len(raw.decode()), "sha256": hashlib.sha256(raw).hexdigest(),
            "tokens": len(lm_ids), "pocketlm_ids_equal": ids == lm_ids[: len(ids)]}  # fmt: skip


def main() -> None:
    args = parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    wait_for_build(args.llama_bin)
    files = prepare(args)
    text = text_file(args.cache)
    ids = llama_ids(files[0][1], text, args.windows, args.llama_bin, args.threads)
    lm_ids = pocketlm.load(files[0][1]).tokenizer.encode(text.read_text(encoding="utf-8"))
    windows = windows_of(ids, args.windows)
    rows = [measure(label, path, text, windows, args) for label, path in files]
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
    report = {
        "stamp": stamp,
        "command": "python benchmarks/gguf_fidelity.py " + " ".join(sys.argv[1:]),
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "windows": args.windows,
        "text": text_report(text, ids, lm_ids),
        "pocketlm_layers": layers(rows, "pocketlm"),
        "pocketlm_fp32_layers": layers(rows, "pocketlm fp32"),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"gguf_fidelity-{stamp}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out}.json and .md")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    every = ["F32", *TYPES, "Q4_1"]
    p.add_argument("--types", type=lambda s: s.split(","), default=every,
                   help=f"comma-separated, of {','.join(every)} (Q4_1: the shipped file)")  # fmt: skip
    p.add_argument("--windows", type=int, default=8, help="512-token windows to score")
    p.add_argument("--threads", type=int, default=2, help="llama-perplexity's -t")
    p.add_argument("--cache", type=Path, default=BENCH / "smollm2")
    p.add_argument("--llama-bin", type=Path, default=BENCH / "llama-build" / "bin")
    args = p.parse_args()
    unknown = set(args.types) - set(every)
    if unknown:
        p.error(f"unknown types {sorted(unknown)}; choose from {','.join(every)}")
    return args


if __name__ == "__main__":
    main()
