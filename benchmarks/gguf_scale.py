"""pocketlm and llama.cpp on the same GGUF files, from SmolLM2-135M up to 7B/8B shapes
(issue 14's "Scale" criterion), in one run on one machine, both on 2 threads.

Files (made once under ~/.cache/pocketlm-bench/gguf/, what exists is skipped):
  - Mistral-7B-v0.1 and Llama-3.1-8B shapes in Q4_K_M: an HF folder with the real
    config.json shapes, random bf16 weights (normal, std 0.02; norms ones; written shard
    by shard) and the real vocabularies (Mistral's SentencePiece tokenizer.model.v1 from
    the mistral-common wheel; Llama 3's tiktoken ranks from the llama-models wheel, made
    into a tokenizer.json with transformers' TikTokenConverter and Llama 3's pattern, which
    llama.cpp's converter recognises as "llama-bpe"), both as tests/vendor.py fetched them;
    converted by llama.cpp's convert_hf_to_gguf.py to F16, quantized by llama.cpp's own
    llama-quantize to Q4_K_M, then the HF weights and the F16 file are deleted.
  - SmolLM2-135M: the shipped Q4_1 file, and Q4_0, Q4_K_M and Q8_0 quantized by
    llama-quantize from an F32 GGUF that is the shipped file dequantized (no HF folder of
    SmolLM2 is kept anywhere; `llama-quantize --allow-requantize ... F32`). Its 576-wide
    rows are not whole 256-blocks, so llama-quantize gives the K types' fallbacks there.

Measured, each in its own subprocess under /usr/bin/time -v (peak RSS, "Maximum resident
set size") and a watchdog that kills the process group at --cap-gb of RSS (recorded as
"killed (RSS reached X)"), engines interleaved file by file:
  - llama.cpp: `llama-bench -m FILE -t 2 -p 512 -n 16 -o json` (prefill, decode tok/s);
    load time from `llama-cli`'s llama_perf "load time" on "Hello", 16 tokens;
  - pocketlm: `pocketlm run FILE "Hello" -n 16` with no flags (output, wall time, RSS);
    the Python API in a worker (torch.set_num_threads(2), pocketlm.load(FILE): load time;
    generate.benchmark.measure: decode of 16 tokens, a 512-token prefill).
Decode is also put against the bandwidth bound: bytes of weights read per token (the
file's tensors for llama.cpp, the token embedding left out unless it is the head; for
pocketlm, its loaded weights as measure counts them) over the read bandwidth measured as
benchmarks/gguf_kernels.py does (best of 8 sums of 512 MB, 2 threads).

    python benchmarks/gguf_scale.py --make-only            # make the files
    python benchmarks/gguf_scale.py --files smollm2         # measure the SmolLM2 files
    python benchmarks/gguf_scale.py                         # everything

Writes benchmarks/results/gguf_scale-<UTC stamp>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path.home() / ".cache" / "pocketlm-bench"
GGUF_DIR = CACHE / "gguf"
BIN = CACHE / "llama-build" / "bin"
VENDOR = Path.home() / ".cache" / "pocketlm-tests" / "unpacked"
LLAMA_CPP = VENDOR / "llama.cpp" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
MISTRAL_SPM = VENDOR / "mistral-common" / "mistral_common" / "data" / "tokenizer.model.v1"
LLAMA3_RANKS = VENDOR / "llama-models" / "llama_models" / "llama3" / "tokenizer.model"
THREADS = 2

_COMMON = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
               torch_dtype="bfloat16")  # fmt: skip
CONFIGS = {
    "mistral-7b": _COMMON | dict(
        architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=32000,
        rope_theta=10000.0, max_position_embeddings=32768, sliding_window=None,
        bos_token_id=1, eos_token_id=2),  # fmt: skip
    "llama-3.1-8b": _COMMON | dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
        rope_theta=500000.0, max_position_embeddings=131072, bos_token_id=128000,
        eos_token_id=128001, attention_bias=False, mlp_bias=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)),
}  # fmt: skip
LLAMA31_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                 "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]  # fmt: skip
SMOL_TYPES = ("Q4_0", "Q4_K_M", "Q8_0")


# -- making the files ---------------------------------------------------------------------


def timed(log: dict, step: str, fn, *args, **kwargs):  # noqa: ANN001, ANN201 (any step)
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    log[step] = round(time.perf_counter() - started, 1)
    print(f"  {step}: {log[step]} s", flush=True)
    return out


def tensor_shapes(config: dict) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The HF checkpoint's tensors, grouped into shards: the embedding, 4 layers a shard,
    then the final norm and the head."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    layer = [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)),
             ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, h)),
             ("mlp.gate_proj", (f, h)), ("mlp.up_proj", (f, h)), ("mlp.down_proj", (h, f)),
             ("input_layernorm", (h,)), ("post_attention_layernorm", (h,))]  # fmt: skip
    shards = [[("model.embed_tokens.weight", (v, h))]]
    n = config["num_hidden_layers"]
    for first in range(0, n, 4):
        shards.append([(f"model.layers.{i}.{name}.weight", shape)
                       for i in range(first, min(n, first + 4)) for name, shape in layer])  # fmt: skip
    shards.append([("model.norm.weight", (h,)), ("lm_head.weight", (v, h))])
    return shards


def write_weights(folder: Path, config: dict) -> None:
    """Random bf16 weights (normal, std 0.02; norms ones), one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(THREADS)
    generator = torch.Generator().manual_seed(0)
    shards = tensor_shapes(config)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shape in shard:
            if len(shape) == 1:
                tensors[key] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[key] = torch.empty(shape, dtype=torch.bfloat16).normal_(
                    0.0, 0.02, generator=generator
                )
            weight_map[key] = name
            total += tensors[key].numel() * 2
        save_file(tensors, folder / name, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def mistral_tokenizer(folder: Path) -> None:
    """Mistral 7B v0.1's SentencePiece model (32,000 pieces), as its HF repo ships it."""
    shutil.copyfile(MISTRAL_SPM, folder / "tokenizer.model")
    config = dict(tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False,
                  bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                  model_max_length=32768)  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def llama3_tokenizer(folder: Path) -> None:
    """Llama 3's tokenizer.json from its tiktoken ranks: Llama 3's split pattern (the
    converter's default), 256 specials with 3.1's names, BOS added as Meta's file does
    (the converter hashes ids with it, and knows the result as "llama-bpe")."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - 11)]
    specials = LLAMA31_NAMED + reserved
    tok = TikTokenConverter(vocab_file=str(LLAMA3_RANKS), extra_special_tokens=specials)
    tok = tok.converted()
    bos = "<|begin_of_text|>"
    template = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 128000)]
    )
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|end_of_text|>",
        model_max_length=131072,
    )  # fmt: skip
    if fast.encode("Hello world") != [128000, 9906, 1917]:  # Llama 3's own ids
        raise RuntimeError("the Llama 3 tokenizer.json does not give Llama 3's ids")
    fast.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text()) | {"tokenizer_class": "PreTrainedTokenizerFast"}
    path.write_text(json.dumps(config, indent=1))


def hf_folder(name: str, log: dict) -> Path:
    folder = CACHE / "hf" / name
    if (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = CONFIGS[name]
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    make_tokenizer = mistral_tokenizer if name.startswith("mistral") else llama3_tokenizer
    timed(log, f"{name}: tokenizer", make_tokenizer, folder)
    timed(log, f"{name}: random bf16 weights", write_weights, folder, config)
    (folder / ".complete").write_text("ok\n")
    return folder


def convert(folder: Path, out: Path) -> None:
    """folder -> out (F16) by llama.cpp's convert_hf_to_gguf.py with its own gguf-py."""
    partial = out.with_name(out.name + ".partial")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    command = [sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(folder),
               "--outfile", str(partial), "--outtype", "f16"]  # fmt: skip
    with open(out.with_suffix(".convert.log"), "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed; see {out.with_suffix('.convert.log')}")
    os.replace(partial, out)


def quantize(source: Path, out: Path, kind: str, *, requantize: bool = False) -> None:
    partial = out.with_name(out.name + ".partial")
    flags = ["--allow-requantize"] if requantize else []
    command = [str(BIN / "llama-quantize"), *flags, str(source), str(partial), kind,
               str(THREADS)]  # fmt: skip
    with open(out.with_suffix(".quantize.log"), "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"llama-quantize failed; see {out.with_suffix('.quantize.log')}")
    os.replace(partial, out)


def make_big(name: str, log: dict) -> Path:
    final = GGUF_DIR / f"{name}.Q4_K_M.gguf"
    if final.is_file():
        return final
    print(f"making {final}", flush=True)
    folder = hf_folder(name, log)
    f16 = GGUF_DIR / f"{name}.F16.gguf"
    if not f16.is_file():
        timed(log, f"{name}: convert_hf_to_gguf.py to F16", convert, folder, f16)
    timed(log, f"{name}: llama-quantize Q4_K_M", quantize, f16, final, "Q4_K_M")
    f16.unlink()
    for shard in folder.glob("*.safetensors"):
        shard.unlink()
    (folder / ".complete").unlink()  # the small files stay, for a look
    return final


def make_smollm2(log: dict) -> list[Path]:
    shipped = shipped_smollm2()
    f32 = GGUF_DIR / "smollm2-135m.F32.gguf"
    if not f32.is_file():
        timed(log, "smollm2: dequantize to F32", quantize, shipped, f32, "F32", requantize=True)
    files = [shipped]
    for kind in SMOL_TYPES:
        out = GGUF_DIR / f"smollm2-135m.{kind}.gguf"
        if not out.is_file():
            timed(log, f"smollm2: llama-quantize {kind}", quantize, f32, out, kind)
        files.append(out)
    return files


def shipped_smollm2() -> Path:
    code = "from pocketlm.weights import sources; print(sources.resolve(None))"
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return Path(got.stdout.strip())


def make_files(names: list[str]) -> tuple[list[Path], dict]:
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    log: dict = {}
    files = make_smollm2(log) if "smollm2" in names else []
    files += [make_big(name, log) for name in names if name in CONFIGS]
    return files, log


# -- running one measurement --------------------------------------------------------------


def session_rss(sid: int) -> int:
    """Bytes resident in the processes of session `sid`."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # field 6 of stat, counted after the name
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


def run_watched(command: list[str], *, cap_gb: float, timeout_s: float) -> dict:
    """`command` under /usr/bin/time -v in a session of its own; the session is killed if
    its RSS passes cap_gb (or what the machine has left: it is shared) or it runs past
    timeout_s. Never raises for the child's fate."""
    cap_gb = min(cap_gb, available_gib() - 1.5)
    with tempfile.TemporaryDirectory() as tmp:
        out, err, rusage = Path(tmp, "out"), Path(tmp, "err"), Path(tmp, "time")
        started = time.perf_counter()
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen(["/usr/bin/time", "-v", "-o", str(rusage), *command],
                                    stdout=o, stderr=e, cwd=ROOT, start_new_session=True)  # fmt: skip
        seen, why = 0, None
        while proc.poll() is None:
            seen = max(seen, session_rss(proc.pid))
            elapsed = time.perf_counter() - started
            if seen > cap_gb * 2**30 or elapsed > timeout_s:
                why = "cap" if seen > cap_gb * 2**30 else "timeout"
                os.killpg(proc.pid, signal.SIGKILL)  # the session this call started
                proc.wait()  # and the loop ends
            time.sleep(0.1)
        result = {"wall_s": time.perf_counter() - started, "rc": proc.returncode,
                  "stdout": out.read_text(errors="replace"),
                  "stderr": err.read_text(errors="replace")[-4000:]}  # fmt: skip
        usage = rusage.read_text(errors="replace") if rusage.is_file() else ""
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", usage)
    result["peak_rss_mb"] = max(int(peak.group(1)) / 1024 if peak else 0, seen / 2**20)
    signalled = re.search(r"terminated by signal (\d+)", usage)
    reached = f"RSS reached {result['peak_rss_mb'] / 1024:.1f} GiB"
    if why == "cap":
        result["status"] = f"killed (over the {cap_gb:.1f} GiB cap; {reached})"
    elif why == "timeout":
        result["status"] = f"killed (ran past {timeout_s:g} s; {reached})"
    elif signalled:
        result["status"] = f"killed (signal {signalled.group(1)}; {reached})"
    elif result["rc"] != 0:
        tail = result["stderr"].strip().splitlines()[-1:] or [""]
        result["status"] = f"failed (exit {result['rc']}: {tail[0][:200]})"
    else:
        result["status"] = "ok"
    return result


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def last_json(text: str) -> dict | list | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith(("{", "[")):
            return json.loads(line)
    return None


# -- the measurements ---------------------------------------------------------------------


def llama_bench(path: Path, args: argparse.Namespace) -> dict:
    command = [str(BIN / "llama-bench"), "-m", str(path), "-t", str(THREADS),
               "-p", str(args.prefill), "-n", str(args.new), "-r", str(args.repeats),
               "-o", "jsonl"]  # fmt: skip
    done = run_watched(command, cap_gb=args.cap_gb, timeout_s=args.timeout)
    out = {k: done[k] for k in ("status", "peak_rss_mb", "wall_s")}
    for line in done["stdout"].splitlines():
        if line.startswith("{"):
            test = json.loads(line)
            out["prefill_tok_s" if test["n_prompt"] else "decode_tok_s"] = test["avg_ts"]
    return out


def llama_load(path: Path, args: argparse.Namespace) -> dict:
    """Wall time of a process that loads the file and decodes one token (llama-bench
    reports no load time of its own; llama.cpp's "load time" counts the first eval)."""
    command = [str(BIN / "llama-bench"), "-m", str(path), "-t", str(THREADS), "-p", "0",
               "-n", "1", "-r", "1", "--no-warmup", "-o", "jsonl"]  # fmt: skip
    done = run_watched(command, cap_gb=args.cap_gb, timeout_s=args.timeout)
    return {k: done[k] for k in ("status", "peak_rss_mb", "wall_s")}


def pocketlm_api(path: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "api",
               "--worker-file", str(path), "--new", str(args.new), "--prefill",
               str(args.prefill), "--repeats", str(args.repeats)]  # fmt: skip
    done = run_watched(command, cap_gb=args.cap_gb, timeout_s=args.timeout)
    out = {k: done[k] for k in ("status", "peak_rss_mb", "wall_s")}
    for line in done["stdout"].splitlines():  # the worker prints after each phase
        if line.startswith("{"):
            out |= json.loads(line)
    if done["status"] == "ok" and "decode_tok_s" not in out:
        out["status"] = f"failed (no figures: {done['stderr'][-200:]})"
    return out


def pocketlm_run(path: Path, args: argparse.Namespace) -> dict:
    """`pocketlm run FILE "Hello" -n 16`, no other flags: what a user types."""
    command = [str(Path(sys.executable).parent / "pocketlm"), "run", str(path), "Hello",
               "-n", str(args.new)]  # fmt: skip
    done = run_watched(command, cap_gb=args.cap_gb, timeout_s=args.timeout)
    out = {k: done[k] for k in ("status", "peak_rss_mb", "wall_s")}
    out["output"] = done["stdout"][-500:]
    if done["status"] != "ok":
        out["stderr"] = done["stderr"][-500:]
    return out


def worker_api(args: argparse.Namespace) -> None:
    """In the child: load through the Python API, then generate.benchmark.measure."""
    started = time.perf_counter()
    import torch

    torch.set_num_threads(THREADS)
    import pocketlm
    from pocketlm.generate.benchmark import measure, peak_rss_mb

    imported = time.perf_counter()
    lm = pocketlm.load(args.worker_file)
    loaded = time.perf_counter()
    phase = {"import_s": imported - started, "load_s": loaded - imported}
    print(json.dumps(phase | {"rss_after_load_mb": peak_rss_mb()}), flush=True)
    m = measure(lm.model, prompt_tokens=8, new_tokens=args.new, prefill_tokens=args.prefill,
                repeats=args.repeats)  # fmt: skip
    print(json.dumps(m.as_dict()), flush=True)


def worker_bandwidth() -> None:
    """Read bandwidth as benchmarks/gguf_kernels.py measures it: best of 8 sums of 512 MB."""
    import torch

    from pocketlm.generate.benchmark import memory_bandwidth

    torch.set_num_threads(THREADS)
    print(json.dumps({"read_gb_s": memory_bandwidth(megabytes=512, repeats=8)}))


def bandwidth(args: argparse.Namespace) -> float | None:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "bandwidth"]
    done = run_watched(command, cap_gb=args.cap_gb, timeout_s=300)
    got = last_json(done["stdout"])
    return got["read_gb_s"] if got else None


def file_info(path: Path) -> dict:
    """Size, file type, tensor types and the bytes one decode step reads from the file."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(path)
    field = reader.fields.get("general.file_type")
    kind = LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_") if field else "?"
    tensors = {t.name: t for t in reader.tensors}
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    lookup = {"token_embd.weight"} if "output.weight" in tensors else set()  # else tied: a head
    read = sum(int(t.n_bytes) for name, t in tensors.items() if name not in lookup)
    return {"file": str(path), "name": path.name, "type": kind, "size_bytes": path.stat().st_size,
            "tensor_types": counts, "bytes_per_token": read}  # fmt: skip


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", lscpu)
    meminfo = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {"cpu": model.group(1) if model else "?", "cores": os.cpu_count(),
            "mem_gb": round(int(meminfo) / 2**20, 1), "threads": THREADS}  # fmt: skip


def measure_all(files: list[Path], args: argparse.Namespace, result: dict) -> None:
    """Fills `result` file by file, saving it after each (a run cut short still reports)."""
    result["machine"] = machine() | {"loadavg_before": loadavg(), "loadavg_after": None}
    result |= {"read_gb_s_before": bandwidth(args), "read_gb_s_after": None, "rows": []}
    for round_ in range(args.rounds):
        for path in files:
            row = file_info(path) | {"round": round_, "loadavg": loadavg()}
            print(f"[{round_}] {path.name} ({row['type']})", flush=True)
            steps = [("llama.cpp", "bench", llama_bench), ("pocketlm", "api", pocketlm_api),
                     ("llama.cpp", "load", llama_load), ("pocketlm", "run", pocketlm_run)]  # fmt: skip
            for engine, what, fn in steps:
                row.setdefault(engine, {})[what] = got = fn(path, args)
                print(f"    {engine} {what}: {short(got)}", flush=True)
            result["rows"].append(row)
            save(result)
    result["read_gb_s_after"] = bandwidth(args)
    result["machine"]["loadavg_after"] = loadavg()
    save(result)


def save(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"gguf_scale-{result['stamp']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))


def short(got: dict) -> str:
    keys = ("status", "peak_rss_mb", "wall_s", "load_s", "decode_tok_s", "prefill_tok_s")
    return ", ".join(f"{k}={got[k]:.2f}" if isinstance(got.get(k), float) else f"{k}={got[k]}"
                     for k in keys if k in got)  # fmt: skip


# -- the report ---------------------------------------------------------------------------


def summary(row: dict, read_gb_s: float | None) -> dict:
    """One row's figures side by side: llama.cpp, pocketlm, pocketlm / llama.cpp."""
    bench, load = row["llama.cpp"]["bench"], row["llama.cpp"]["load"]
    api = row["pocketlm"]["api"]
    decode = bench.get("decode_tok_s")
    llama_load_s = None
    if load["status"] == "ok" and decode:
        llama_load_s = load["wall_s"] - 1 / decode  # the process less its one token
    s = {"rss_mb": (bench["peak_rss_mb"], api["peak_rss_mb"]),
         "load_s": (llama_load_s, api.get("load_s")),
         "decode_tok_s": (decode, api.get("decode_tok_s")),
         "prefill_tok_s": (bench.get("prefill_tok_s"), api.get("prefill_tok_s"))}  # fmt: skip
    s = {k: (a, b, b / a if a and b else None) for k, (a, b) in s.items()}
    per_token = (row["bytes_per_token"], api.get("bytes_per_token"))
    s["of_bound"] = tuple(
        d / (read_gb_s * 1e9 / n) if d and n and read_gb_s else None
        for d, n in zip(s["decode_tok_s"][:2], per_token, strict=True)
    )
    s["status"] = (bench["status"], api["status"])
    return s


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    m, got = result["machine"], [result["read_gb_s_before"], result["read_gb_s_after"]]
    bw = max((g for g in got if g), default=None)  # the better one: others share the machine
    lines = [f"# GGUF at scale: pocketlm vs llama.cpp, {result['stamp']} UTC, {THREADS} threads",
             "", f"`{result['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gb']} GiB; load average "
             f"before `{m['loadavg_before']}`, after `{m['loadavg_after']}` (shared machine). "
             f"Read bandwidth (sum of 512 MB, best of 8, {THREADS} threads): "
             f"{fmt(got[0], '.1f')} GB/s before, {fmt(got[1], '.1f')} after (the bound uses the larger).",
             "", "Each cell: llama.cpp / pocketlm (pocketlm ÷ llama.cpp). Decode: "
             f"{result['args']['new']} tokens; prefill: {result['args']['prefill']} tokens. "
             "Of bound: decode tok/s ÷ (bandwidth ÷ bytes of weights read per token).", "",
             "| file | type | size GiB | peak RSS GiB | load s | decode tok/s | prefill tok/s "
             "| decode of bound | status | load avg |", "|" + "---|" * 10]  # fmt: skip
    for row in result["rows"]:
        s = summary(row, bw)
        cells = [row["name"], row["type"], fmt(row["size_bytes"] / 2**30)]
        for key, spec in (("rss_mb", ".2f"), ("load_s", ".2f"), ("decode_tok_s", ".1f"),
                          ("prefill_tok_s", ".1f")):  # fmt: skip
            a, b, r = s[key]
            if key == "rss_mb":
                a, b = (None if v is None else v / 1024 for v in (a, b))
            cells.append(f"{fmt(a, spec)} / {fmt(b, spec)} ({fmt(r)}×)")
        cells.append(" / ".join(fmt(f, ".0%") for f in s["of_bound"]))
        cells.append(" / ".join(s["status"]))
        cells.append(row["loadavg"].split()[0])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f'`pocketlm run FILE "Hello" -n {result["args"]["new"]}` (no other flags):', "",
              "| file | status | wall s | peak RSS GiB | output |", "|---|---|---|---|---|"]  # fmt: skip
    for row in result["rows"]:
        run = row["pocketlm"]["run"]
        text = " ".join(run.get("output", "").split())[:80].replace("|", "\\|")
        lines.append(f"| {row['name']} | {run['status']} | {fmt(run['wall_s'], '.1f')} | "
                     f"{fmt(run['peak_rss_mb'] / 1024)} | {text} |")  # fmt: skip
    lines += ["", "| file | tensor types | weight bytes read per token (llama.cpp / pocketlm) | path |",
              "|---|---|---|---|"]  # fmt: skip
    for row in result["rows"]:
        types = ", ".join(f"{k} {v}" for k, v in sorted(row["tensor_types"].items()))
        ours = row["pocketlm"]["api"].get("bytes_per_token")
        lines.append(f"| {row['name']} | {types} | {row['bytes_per_token'] / 1e6:.1f} MB / "
                     f"{fmt(ours and ours / 1e6, '.1f')} MB | `{row['file']}` |")  # fmt: skip
    if result.get("making"):
        lines += ["", "Making the files (s): " + ", ".join(
            f"{k} {v}" for k, v in result["making"].items())]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", default="smollm2,mistral-7b,llama-3.1-8b",
                        help="comma-separated: smollm2, mistral-7b, llama-3.1-8b")  # fmt: skip
    parser.add_argument("--make-only", action="store_true", help="make the files, measure nothing")
    parser.add_argument("--new", type=int, default=16, help="decode tokens")
    parser.add_argument("--prefill", type=int, default=512, help="prefill tokens")
    parser.add_argument(
        "--repeats", type=int, default=2, help="best of (pocketlm), mean of (llama-bench)"
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--cap-gb", type=float, default=18.0, help="RSS (GiB) at which a child is killed"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    parser.add_argument("--worker", choices=["api", "bandwidth"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_api(args) if args.worker == "api" else worker_bandwidth()
    files, making = make_files(args.files.split(","))
    if args.make_only:
        print(json.dumps({"files": [str(f) for f in files], "making_s": making}, indent=1))
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
    result = {"stamp": stamp, "command": "python benchmarks/gguf_scale.py " + " ".join(sys.argv[1:]),
              "args": vars(args), "making": making}  # fmt: skip
    measure_all(files, args, result)
    print(markdown(result))
    return None


if __name__ == "__main__":
    main()
