"""Fuzz pocketlm's GGUF reader with malformed files.

Model loaders have had memory-safety bugs in exactly this place: a header whose counts,
lengths, dimensions or offsets lie. This script writes two small valid GGUF files (a
Llama with several block formats and a tokenizer vocabulary, and a GPT-2), then mutates
them thousands of times: truncations, bit flips, byte splats, deleted or repeated runs,
and "interesting" values (0, 2^31, 2^63, 2^64-1, the file size, off-by-one...) written
into the exact length / count / type / dimension / offset fields that gguf-py's reader
locates. Every case must end in a `PocketLMError` or load cleanly: any other exception,
a case running past the time limit, or a jump in peak memory counts as a bug.

    python benchmarks/fuzz_loaders.py --cases 5000 --seed 0
    python benchmarks/fuzz_loaders.py --seed 0 --replay 1234   # one case, with traceback

Knows nothing of models beyond the public `read_gguf` / `gguf_state_dict` /
`gguf_raw_tensors`. A seeded mutator (not hypothesis) so that a case number replays.
"""

import argparse
import random
import re
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from pocketlm.errors import PocketLMError
from pocketlm.weights.gguf import gguf_raw_tensors, gguf_state_dict, read_gguf

U32_VALUES = [0, 1, 2, 3, 4, 5, 7, 8, 12, 13, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1]
U64_VALUES = [0, 1, 2, 8, 31, 32, 33, 255, 2**16, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1,
              2**63, 2**64 - 32, 2**64 - 1]  # fmt: skip
MAX_RSS_GROWTH_MB = 512  # the seeds dequantize to well under 1 MB
# Some cases grow the file with a 1 GB hole (sparse: no disk), so that a corrupt count or
# length passes "fits in the file" and only pocketlm's own caps stand between it and a
# multi-GB list of Python objects.
HOLE = 1 << 30


@dataclass
class Slot:
    """A little-endian integer field of the seed file: where, how wide, what it was."""

    offset: int
    width: int  # 4 or 8 bytes
    value: int


@dataclass
class Seed:
    data: bytes
    slots: list[Slot]
    header_end: int  # tensor data starts after this


@dataclass
class Report:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    slowest: tuple[float, int] = (0.0, -1)  # (seconds, case)
    rss_mb: float = field(default_factory=lambda: _max_rss_mb())  # peak RSS so far

    def record(self, case: int, what: str, outcome: str, *, seconds: float) -> None:
        """Count one case's outcome; a BUG (or peak RSS grown past the limit) is kept whole."""
        self.slowest = max(self.slowest, (seconds, case))
        if _max_rss_mb() - self.rss_mb > MAX_RSS_GROWTH_MB:
            self.rss_mb = _max_rss_mb()
            outcome = f"BUG memory: peak RSS grew to {self.rss_mb:.0f} MB"
        if outcome.startswith("BUG"):
            self.failures.append(f"case {case} ({what}): {outcome}")
            outcome = re.split(r" at |:", outcome)[0]  # count bugs by exception type
        self.outcomes[outcome] += 1
        self.cases += 1

    def summary(self) -> str:
        bugs = sum(n for kind, n in self.outcomes.items() if kind.startswith("BUG"))
        lines = [f"{self.cases} cases in {self.seconds:.1f}s: {bugs} bugs"]
        lines += [f"slowest case: {self.slowest[1]} ({self.slowest[0] * 1e3:.0f} ms)"]
        lines += [f"{n:7d}  {kind}" for kind, n in self.outcomes.most_common()]
        lines += ["failures:", *self.failures[:20]] if self.failures else []
        return "\n".join(lines)


# --- seeds ----------------------------------------------------------------------------


def _write(path: Path, arch: str, *, kv: dict, tensors: dict) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    for key, (value, kind) in kv.items():
        getattr(w, f"add_{kind}")(key, value)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _quant(rng: np.random.Generator, shape: tuple[int, int], type_name: str | None):
    x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    if type_name in (None, "F32"):
        return x, None
    if type_name == "F16":
        return x.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[type_name]
    return gguf.quants.quantize(x, qtype), qtype


def write_llama_seed(path: Path) -> Path:
    """2 layers, 64 wide, 4 heads / 2 KV heads, a 32-token vocabulary, mixed block types."""
    rng = np.random.default_rng(0)
    kv = {
        "llama.block_count": (2, "uint32"),
        "llama.context_length": (128, "uint32"),
        "llama.embedding_length": (64, "uint32"),
        "llama.feed_forward_length": (128, "uint32"),
        "llama.attention.head_count": (4, "uint32"),
        "llama.attention.head_count_kv": (2, "uint32"),
        "llama.rope.freq_base": (10000.0, "float32"),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, "float32"),
        "general.file_type": (3, "uint32"),
        "tokenizer.ggml.model": ("gpt2", "string"),
        "tokenizer.ggml.tokens": ([f"t{i}" for i in range(32)], "array"),
        "tokenizer.ggml.token_type": ([1] * 32, "array"),
        "tokenizer.ggml.merges": ([f"t{i} t{i + 1}" for i in range(8)], "array"),
        "tokenizer.ggml.bos_token_id": (1, "uint32"),
        "tokenizer.ggml.add_bos_token": (False, "bool"),
        "tokenizer.chat_template": ("{{ messages }}", "string"),
    }
    tensors = {"token_embd.weight": _quant(rng, (32, 64), "Q8_0")}
    tensors["output_norm.weight"] = _quant(rng, (1, 64), None)[0][0], None
    layer = {"attn_q": (64, 64, "Q4_1"), "attn_k": (32, 64, "Q4_0"), "attn_v": (32, 64, "Q5_0"),
             "attn_output": (64, 64, "Q5_1"), "ffn_gate": (128, 64, "F16"),
             "ffn_up": (128, 64, "Q8_0"), "ffn_down": (64, 128, "F32")}  # fmt: skip
    for i in range(2):
        tensors[f"blk.{i}.attn_norm.weight"] = _quant(rng, (1, 64), None)[0][0], None
        tensors[f"blk.{i}.ffn_norm.weight"] = _quant(rng, (1, 64), None)[0][0], None
        for name, (rows, cols, type_name) in layer.items():
            tensors[f"blk.{i}.{name}.weight"] = _quant(rng, (rows, cols), type_name)
    return _write(path, "llama", kv=kv, tensors=tensors)


def write_gpt2_seed(path: Path) -> Path:
    """1 layer, 32 wide, 16 positions, a separate output matrix, all F32 with biases."""
    rng = np.random.default_rng(1)
    kv = {
        "gpt2.block_count": (1, "uint32"),
        "gpt2.context_length": (16, "uint32"),
        "gpt2.embedding_length": (32, "uint32"),
        "gpt2.feed_forward_length": (128, "uint32"),
        "gpt2.attention.head_count": (2, "uint32"),
        "gpt2.attention.layer_norm_epsilon": (1e-5, "float32"),
    }
    shapes = {"token_embd.weight": (24, 32), "position_embd.weight": (16, 32),
              "output_norm.weight": (32,), "output_norm.bias": (32,), "output.weight": (24, 32),
              "blk.0.attn_norm.weight": (32,), "blk.0.attn_norm.bias": (32,),
              "blk.0.attn_qkv.weight": (96, 32), "blk.0.attn_qkv.bias": (96,),
              "blk.0.attn_output.weight": (32, 32), "blk.0.attn_output.bias": (32,),
              "blk.0.ffn_norm.weight": (32,), "blk.0.ffn_norm.bias": (32,),
              "blk.0.ffn_up.weight": (128, 32), "blk.0.ffn_up.bias": (128,),
              "blk.0.ffn_down.weight": (32, 128), "blk.0.ffn_down.bias": (32,)}  # fmt: skip
    tensors = {n: (rng.standard_normal(s).astype(np.float32), None) for n, s in shapes.items()}
    return _write(path, "gpt2", kv=kv, tensors=tensors)


def load_seed(path: Path) -> Seed:
    """The seed's bytes and the integer fields gguf-py's reader finds in its header."""
    reader = gguf.GGUFReader(path)
    base = reader.data.ctypes.data
    slots = []
    fields = list(reader.fields.values()) + [t.field for t in reader.tensors]
    for f in fields:
        for part in f.parts:
            if part.dtype.kind in "ui" and part.dtype.itemsize in (4, 8) and part.size <= 8:
                start = part.ctypes.data - base
                for j, value in enumerate(part.tolist()):
                    slots.append(
                        Slot(start + j * part.dtype.itemsize, part.dtype.itemsize, int(value))
                    )
    return Seed(path.read_bytes(), slots, reader.data_offset)


# --- mutations ------------------------------------------------------------------------


def _position(rng: random.Random, seed: Seed, size: int) -> int:
    """Mostly inside the header, where the structure is; sometimes anywhere."""
    end = seed.header_end if rng.random() < 0.85 else size
    return rng.randrange(max(1, min(end, size)))


def mutate(seed: Seed, rng: random.Random) -> tuple[bytes, str, int]:
    """Mutated bytes, the operations applied, and the file size (> len(bytes): a hole)."""
    data = bytearray(seed.data)
    ops = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        op = rng.choice(["slot", "slot", "slot", "bitflip", "splat", "truncate", "splice"])
        ops.append(op)
        if op == "slot":
            slot = rng.choice(seed.slots)
            pool = U64_VALUES if slot.width == 8 else U32_VALUES
            size = len(seed.data)
            near = [
                slot.value - 1,
                slot.value + 1,
                slot.value * 2,
                size,
                size + 1,
                size - slot.offset,
            ]
            value = rng.choice(pool + [v for v in near if 0 <= v < 2 ** (8 * slot.width)])
            if slot.offset + slot.width <= len(data):
                data[slot.offset : slot.offset + slot.width] = value.to_bytes(slot.width, "little")
        elif op == "bitflip":
            for _ in range(rng.randint(1, 4)):
                data[_position(rng, seed, len(data))] ^= 1 << rng.randrange(8)
        elif op == "splat":
            at, n = _position(rng, seed, len(data)), rng.randint(1, 16)
            fill = rng.choice([b"\x00", b"\xff", bytes([rng.randrange(256)])])
            data[at : at + n] = fill * n if rng.random() < 0.5 else rng.randbytes(n)
        elif op == "truncate":
            del data[_position(rng, seed, len(data)) :]
        else:  # splice: delete or repeat a run, shifting everything after it
            at, n = _position(rng, seed, len(data)), rng.randint(1, 64)
            if rng.random() < 0.5:
                del data[at : at + n]
            else:
                data[at:at] = data[at : at + n]
    size = len(data)
    if rng.random() < 0.1:
        ops.append("hole")
        size += HOLE
    return bytes(data), "+".join(ops), size


# --- running --------------------------------------------------------------------------


class CaseTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise CaseTimeout


def _kind(error: PocketLMError) -> str:
    """A short, number-free description of an error, to count outcomes by."""
    text = str(error)
    m = re.search(r"not a valid GGUF file \((.*?)(, at byte \d+)?\);", text)
    text = m[1] if m else text.split(": ", 1)[-1]
    text = re.sub(r"'[^']*'|\"[^\"]*\"|(?<=tensor )\S+|\S+\.gguf", "…", text)
    text = re.sub(r"\[[^\]]*\]|\([^)]*\)|-?\d+(\.\d+)?(e-?\d+)?", "N", text)
    return f"{type(error).__name__}: {text[:70]}"


def write_case(path: Path, data: bytes, size: int) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)


def run_case(path: Path, data: bytes, *, size: int, timeout: float) -> str:
    """Load `data` as a GGUF file the way pocketlm does; the outcome's kind."""
    write_case(path, data, size)

    def load() -> str:
        ckpt = read_gguf(path)
        gguf_state_dict(ckpt)
        gguf_raw_tensors(ckpt)
        return "ok"

    return classify(load, timeout=timeout)


def classify(action: Callable[[], str], *, timeout: float) -> str:
    """Run one case under a timer: its result, our one-line error's kind, or a BUG line
    for anything else (another exception, a multi-line message, a hang)."""
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return action()
    except PocketLMError as e:
        if "\n" in str(e):
            return f"BUG multi-line message: {str(e)[:80]!r}"
        return _kind(e)
    except CaseTimeout:
        return "BUG timeout"
    except Exception as e:  # the point of fuzzing: anything else is a bug
        where = traceback.extract_tb(e.__traceback__)[-1]
        return (
            f"BUG {type(e).__name__} at {Path(where.filename).name}:{where.lineno}: {str(e)[:80]}"
        )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def fuzz(*, cases: int, seed: int = 0, folder: Path, timeout: float = 5.0) -> Report:
    """Run `cases` mutated files (case i is reproducible from (seed, i))."""
    seeds = [load_seed(write_llama_seed(folder / "llama.gguf")),
             load_seed(write_gpt2_seed(folder / "gpt2.gguf"))]  # fmt: skip
    for s in seeds:  # the unmutated seeds must load
        assert run_case(folder / "case.gguf", s.data, size=len(s.data), timeout=timeout) == "ok"
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    report, start = Report(), time.perf_counter()
    try:
        for i in range(cases):
            rng = random.Random(f"{seed}:{i}")
            data, ops, size = mutate(rng.choice(seeds), rng)
            began = time.perf_counter()
            outcome = run_case(folder / "case.gguf", data, size=size, timeout=timeout)
            report.record(i, ops, outcome, seconds=time.perf_counter() - began)
    finally:
        signal.signal(signal.SIGALRM, previous)
    report.seconds = time.perf_counter() - start
    return report


def _limit_address_space(gb: float) -> None:
    """Make a multi-GB allocation fail loudly (MemoryError, a bug) instead of swapping."""
    with open("/proc/self/statm") as f:
        vm_bytes = int(f.read().split()[0]) * resource.getpagesize()
    limit = vm_bytes + int(gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per case")
    parser.add_argument(
        "--mem-gb", type=float, default=3.0, help="address space allowed beyond startup"
    )
    parser.add_argument("--replay", type=int, help="run one case and show its traceback")
    args = parser.parse_args(argv)
    _limit_address_space(args.mem_gb)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.replay is not None:
            seeds = [
                load_seed(write_llama_seed(folder / "l.gguf")),
                load_seed(write_gpt2_seed(folder / "g.gguf")),
            ]
            rng = random.Random(f"{args.seed}:{args.replay}")
            data, ops, size = mutate(rng.choice(seeds), rng)
            print(f"case {args.replay}: {ops}, {size} bytes")
            write_case(folder / "case.gguf", data, size)
            ckpt = read_gguf(folder / "case.gguf")
            gguf_state_dict(ckpt)
            gguf_raw_tensors(ckpt)
            print("loaded")
            return 0
        report = fuzz(cases=args.cases, seed=args.seed, folder=folder, timeout=args.timeout)
    print(report.summary())
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
