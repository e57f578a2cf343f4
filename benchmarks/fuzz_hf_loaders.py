"""Fuzz pocketlm's Hugging Face checkpoint reader (config.json, safetensors, shard index).

The sibling of `fuzz_loaders.py` (GGUF). Two tiny seed folders, made with transformers
through `tests/checkpoints.py`: a GPT-2 with one `model.safetensors`, and a Llama resharded
into two files with a `model.safetensors.index.json`; both carry a 259-token byte-level
vocabulary so a case costs milliseconds. Each case mutates one or more of:

- `model.safetensors`: the 8-byte header length (0, 2^63, the file size...), the JSON
  header rewritten field by field (dtypes, shapes with huge / negative / float dims,
  data_offsets swapped, overlapping, past the end, negative), or raw bytes (truncations,
  bit flips, splats, a 1 GB sparse hole after the data);
- `model.safetensors.index.json`: weight_map of the wrong type, shards that are missing,
  empty, absolute or outside the folder;
- `config.json`: sizes set to 0, -1, 2^40, 2^50, 2^64, floats, strings, bools, lists;
  n_head not dividing n_embd; model_type removed; rope_scaling malformed; a non-dict
  document, invalid UTF-8, truncated JSON, NaN.

Then `pocketlm.weights.loader.load(folder)`, and when it succeeds, two greedy tokens
through `pocketlm.api.LM` (so the KV cache is allocated the way users get it). Every case
must end in success or a one-line `PocketLMError`; any other exception, a case running
past the time limit, or a jump in peak memory counts as a bug. The address space is
capped (RLIMIT_AS) so a multi-GB allocation fails loudly instead of swapping.

    python benchmarks/fuzz_hf_loaders.py --cases 5000 --seed 0
    python benchmarks/fuzz_hf_loaders.py --seed 0 --replay 1234   # one case, with traceback

A seeded mutator (not hypothesis), as in the GGUF fuzzer, so that a case number replays.
"""

import argparse
import json
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]  # the GGUF fuzzer, checkpoints

import torch  # noqa: E402
from fuzz_loaders import (  # noqa: E402 - shared with the GGUF fuzzer
    HOLE,
    Report,
    _limit_address_space,
    _on_alarm,
    classify,
)
from safetensors.torch import load_file, save_file  # noqa: E402

from pocketlm.api import LM  # noqa: E402
from pocketlm.errors import PocketLMError  # noqa: E402
from pocketlm.weights.loader import load  # noqa: E402

INDEX = "model.safetensors.index.json"
INTS = [0, 1, 2, 3, 7, 8, 255, 2**16, 2**31 - 1, 2**31, 2**32, 2**40, 2**50, 2**63 - 1,
        2**63, 2**64 - 1, 2**64, 10**30, -1, -2, -(2**31), -(2**63)]  # fmt: skip
ODD = [1.5, 64.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e308, "64", "", "gpt2",
       True, False, None, [], [64], {}, {"a": 1}]  # fmt: skip
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F4", "Q4",
          "f32", "", 5, None, ["F32"]]  # fmt: skip
ROPE_SCALINGS = [
    {"rope_type": "linear"}, {"rope_type": "linear", "factor": 0}, {"type": "linear", "factor": -2},
    {"rope_type": "linear", "factor": "2"}, {"rope_type": "linear", "factor": float("inf")},
    {"rope_type": "llama3", "factor": 8.0},
    {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 0,
     "low_freq_factor": 0, "high_freq_factor": 0},
    {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
     "low_freq_factor": 4.0, "high_freq_factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
     "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    {"rope_type": "yarn", "factor": 2.0}, {"rope_type": 5}, {"rope_type": None}, {},
    "linear", [], 3, {"rope_theta": "x"}, {"rope_theta": -1.0, "rope_type": "default"},
    {"rope_theta": 2**64, "rope_type": "default"},
]  # fmt: skip
VOCAB = 259  # 256 bytes, "Ġt", "he", <|endoftext|>


@dataclass
class Seed:
    name: str
    files: dict[str, bytes]  # the files cases mutate, by name
    folder: Path  # where the tokenizer files live; cases get a copy of them


# --- seeds ----------------------------------------------------------------------------


def _write_tiny_tokenizer(folder: Path) -> None:
    """A byte-level BPE with 259 tokens (the real GPT-2 alphabet, two merges)."""
    from pocketlm.tokenizer.decoding import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab |= {"Ġt": 256, "he": 257, "<|endoftext|>": 258}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nĠ t\nh e\n")


def make_seeds(folder: Path) -> list[Seed]:
    from checkpoints import make_gpt2, make_llama

    gpt2 = make_gpt2(folder / "gpt2", with_tokenizer=False, vocab_size=VOCAB, n_embd=32,
                     n_layer=2, n_head=2, n_positions=32, bos_token_id=VOCAB - 1,
                     eos_token_id=VOCAB - 1)  # fmt: skip
    llama = make_llama(folder / "llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)  # fmt: skip
    _reshard(llama)
    seeds = []
    for path in (gpt2, llama):
        _write_tiny_tokenizer(path)
        names = ["config.json", INDEX, *(p.name for p in path.glob("*.safetensors"))]
        files = {n: (path / n).read_bytes() for n in names if (path / n).is_file()}
        seeds.append(Seed(path.name, files, path))
    return seeds


def _reshard(folder: Path) -> None:
    """Split model.safetensors in two shards with an index, as large checkpoints come."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}  # fmt: skip
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# --- mutations ------------------------------------------------------------------------


def _interesting_int(rng: random.Random, value: int = 0) -> object:
    near = [value - 1, value + 1, value * 2, value // 2, -value]
    return rng.choice(INTS + near if rng.random() < 0.8 else ODD)


def _split_safetensors(data: bytes) -> tuple[dict | None, bytes]:
    n = int.from_bytes(data[:8], "little")
    try:
        return json.loads(data[8 : 8 + n]), data[8 + n :]
    except (ValueError, UnicodeDecodeError):
        return None, data[8 + n :]


def _join_safetensors(header: object, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the writers pad the header to 8 bytes
    return len(text).to_bytes(8, "little") + text + body


def mutate_header(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Rewrite one field of the safetensors JSON header (and mostly keep its length right)."""
    header, body = _split_safetensors(data)
    if not isinstance(header, dict):
        return data, "header-unparsed"
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    what = rng.choice(["dtype", "shape", "shape", "offsets", "offsets", "offsets", "entry", "doc"])
    if what == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif what == "shape":
        shape = list(entry["shape"])
        choice = rng.randrange(5)
        if choice == 0 and shape:
            shape[rng.randrange(len(shape))] = _interesting_int(rng, shape[0])
        elif choice == 1:
            shape = rng.choice([[], [0], [2**32, 2**32], [2**63], [2**64], [-1, 32], [2] * 40])
        elif choice == 2:
            shape = shape[::-1] + [1]
        elif choice == 3:
            shape = rng.choice(ODD)
        else:  # the same element count in another layout
            shape = [s * 2 if i == 0 else s for i, s in enumerate(shape)][:1] + [
                s // 2 for s in shape[1:]
            ]
        entry["shape"] = shape
    elif what == "offsets":
        start, end = entry["data_offsets"]
        other = header[rng.choice(names)]["data_offsets"]
        entry["data_offsets"] = rng.choice([
            [end, start], [start, start], [start, end + 4], [start + 1, end + 1], [start, end - 4],
            list(other), [other[0], end], [-1, end], [start, len(body) + 4], [start, 2**64],
            [start, 2**63], [2**64 - 1, 2**64 + 3], [start], [start, end, end], ["0", end],
            [float(start), end], None,
        ])  # fmt: skip
        offsets = entry["data_offsets"]
        if rng.random() < 0.3 and offsets and all(isinstance(o, int) for o in offsets):
            entry["shape"] = [max(0, (offsets[-1] - offsets[0]) // 4)]  # so it gets further
    elif what == "entry":
        op = rng.randrange(4)
        if op == 0:
            del header[name]
        elif op == 1:
            header[name + ".copy"] = dict(entry)
        elif op == 2:
            del entry[rng.choice(list(entry))]
        else:
            header[name] = rng.choice(ODD)
    else:
        header = rng.choice([[], "x", 5, None, {"__metadata__": 5, **header}, {},
                             {"__metadata__": {"format": ["pt"]}, **header}])  # fmt: skip
    new = _join_safetensors(header, body)
    if rng.random() < 0.15:  # a header length that lies about the rewritten header
        n = int.from_bytes(new[:8], "little") + rng.choice([-9, -1, 1, 8, 1000])
        new = (n % 2**64).to_bytes(8, "little") + new[8:]
    return new, f"header:{what}"


def mutate_length(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """The 8-byte header length itself."""
    n = int.from_bytes(data[:8], "little")
    pool = [0, 1, 2, 7, 8, n - 1, n + 1, n * 2, len(data), len(data) - 7, len(data) - 8, 2**31,
            2**32, 100_000_000, 100_000_001, 2**63, 2**64 - 1]  # fmt: skip
    return (rng.choice(pool) % 2**64).to_bytes(8, "little") + data[8:], "length"


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Raw damage: truncation, bit flips, splats; mostly in the header."""
    data = bytearray(data)
    header_end = 8 + int.from_bytes(data[:8], "little")

    def where() -> int:
        end = min(header_end, len(data)) if rng.random() < 0.8 else len(data)
        return rng.randrange(max(1, end))

    op = rng.choice(["truncate", "bitflip", "splat"])
    if op == "truncate":
        del data[rng.choice([where(), header_end, header_end + 1, len(data) - 1, 7, 0]) :]
    elif op == "bitflip":
        for _ in range(rng.randint(1, 4)):
            data[where()] ^= 1 << rng.randrange(8)
    else:
        at, n = where(), rng.randint(1, 16)
        data[at : at + n] = rng.choice([b"\x00", b"\xff", b"9", b'"', b"}"]) * n
    return bytes(data), f"bytes:{op}"


def mutate_config(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    config = json.loads(data)
    op = rng.choice(["value", "value", "value", "value", "delete", "heads", "rope", "document"])
    if op == "value":
        key = rng.choice([k for k, v in config.items() if not isinstance(v, dict)])
        config[key] = _interesting_int(rng, config[key] if isinstance(config[key], int) else 0)
        op = f"value:{key}"
    elif op == "delete":
        key = rng.choice(["model_type", *config])
        config.pop(key, None)
        op = f"delete:{key}"
    elif op == "heads":  # heads that do not divide the width, or more KV heads than heads
        for key in ("n_head", "num_attention_heads", "num_key_value_heads"):
            if key in config:
                config[key] = rng.choice([3, 5, 7, 64, 33])
    elif op == "rope":
        config[rng.choice(["rope_scaling", "rope_parameters"])] = rng.choice(ROPE_SCALINGS)
    else:
        return rng.choice([b"[]", b'"gpt2"', b"5", b"null", b"\xff\xfe{}", data[: len(data) // 2],
                           data.replace(b"{", b'{"vocab_size": NaN, ', 1),
                           data.replace(b'"', b'"\xc3\x28', 1), b"[" * 100_000 + b"]" * 100_000,
                           data.replace(b"{", b'{"n_embd": 1' + b"0" * 5000 + b", ", 1),
                           data.replace(b"{", b'{"n_embd": 1' + b"0" * 400 + b", ", 1)]), "config:document"  # fmt: skip
    return json.dumps(config).encode(), f"config:{op}"


def mutate_index(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    index = json.loads(data)
    weight_map = index["weight_map"]
    key = rng.choice(list(weight_map))
    op = rng.randrange(8)
    if op == 0:
        index["weight_map"] = rng.choice([[], "x", None, 5, {}, list(weight_map.values())])
    elif op == 1:
        weight_map[key] = rng.choice(["missing.safetensors", "", ".", "..", "/etc/passwd",
                                      "../gpt2/model.safetensors", "config.json", "vocab.json",
                                      5, None, ["a"], {"a": 1}])  # fmt: skip
    elif op == 2:
        index.pop("weight_map")
    elif op == 3:  # every tensor in one shard: the other shard's tensors go missing
        first = min(weight_map.values())
        index["weight_map"] = dict.fromkeys(weight_map, first)
    elif op == 4:
        return rng.choice([b"[]", b"\xff", data[: len(data) // 2]]), "index:document"
    elif op == 5:
        index = rng.choice([[], "x", None])
    else:
        del weight_map[key]  # harmless: the shards' own headers list their tensors
    return json.dumps(index).encode(), f"index:{op}"


def mutate(seed: Seed, rng: random.Random) -> tuple[dict[str, bytes | None], str, int]:
    """The case's files (None: removed), the operations applied, and how many bytes of
    sparse hole to append to each safetensors file (0: none)."""
    files: dict[str, bytes | None] = dict(seed.files)
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    ops = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        target = rng.choice(["header"] * 5 + ["length", "bytes", "bytes", "config", "config",
                                              "config", "config", "index", "remove"])  # fmt: skip
        if target == "index" and INDEX not in files:
            target = "config"
        shard = rng.choice(shards)
        if target == "remove":
            name = rng.choice(list(files))
            files[name], op = None, f"remove:{name}"
        elif target == "config" and files["config.json"] is not None:
            files["config.json"], op = _guard(mutate_config, files["config.json"], rng)
        elif target == "index" and files[INDEX] is not None:
            files[INDEX], op = _guard(mutate_index, files[INDEX], rng)
        elif files[shard] is not None and target in ("header", "length", "bytes"):
            mutator = {"header": mutate_header, "length": mutate_length, "bytes": mutate_bytes}
            files[shard], op = _guard(mutator[target], files[shard], rng)
        else:
            op = "noop"
        ops.append(op)
    hole = 0
    if rng.random() < 0.05:
        ops.append("hole")
        hole = HOLE
    return files, "+".join(ops), hole


def _guard(mutator, data: bytes, rng: random.Random) -> tuple[bytes, str]:  # noqa: ANN001
    """Mutate data that an earlier operation of the same case may already have broken."""
    try:
        return mutator(data, rng)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError):
        return data[::2], "garble"


# --- running --------------------------------------------------------------------------


def write_case(folder: Path, seed: Seed, files: dict[str, bytes | None], *, hole: int) -> Path:
    """The case folder: the seed's tokenizer files plus the (mutated) checkpoint files."""
    case = folder / f"case-{seed.name}"
    if not case.is_dir():
        shutil.copytree(seed.folder, case)
    for name, data in files.items():
        (case / name).unlink(missing_ok=True)
        if data is not None:
            with open(case / name, "wb") as f:
                f.write(data)
                if hole and name.endswith(".safetensors"):
                    f.truncate(len(data) + hole)
    return case


def load_and_generate(case: Path) -> str:
    loaded = load(case)
    lm = LM(loaded, name="fuzz")
    try:
        lm.generate("the", max_tokens=2, temperature=0.0)
    except PocketLMError as error:
        return f"ok, then {_kind(error)}"
    return "ok"


def _kind(error: PocketLMError) -> str:
    """A short, number- and path-free description of an error, to count outcomes by."""
    text = re.sub(r"/\S*", "…", str(error))
    text = re.sub(r"config \S+ = .*? is not valid", "config … is not valid", text)
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "…", text)
    text = re.sub(r"\([^)]*\)|-?\d+(\.\d+)?(e[-+]?\d+)?", "N", text)
    return f"{type(error).__name__}: {text[:70]}"


def run_case(case: Path, *, timeout: float) -> str:
    return classify(lambda: load_and_generate(case), timeout=timeout)


def fuzz(*, cases: int, seed: int = 0, folder: Path, timeout: float = 5.0) -> Report:
    """Run `cases` mutated checkpoints (case i is reproducible from (seed, i))."""
    seeds = make_seeds(folder / "seeds")
    for s in seeds:  # the unmutated seeds must load and generate
        outcome = run_case(write_case(folder, s, s.files, hole=0), timeout=60.0)
        assert outcome == "ok", outcome
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    # One thread: a tiny model's matmuls are all overhead, and on a busy machine a second
    # thread's spin-waits made each case ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    report, start = Report(), time.perf_counter()
    try:
        for i in range(cases):
            rng = random.Random(f"{seed}:{i}")
            s = rng.choice(seeds)
            files, ops, hole = mutate(s, rng)
            began = time.perf_counter()
            outcome = run_case(write_case(folder, s, files, hole=hole), timeout=timeout)
            report.record(i, f"{s.name}: {ops}", outcome, seconds=time.perf_counter() - began)
    finally:
        signal.signal(signal.SIGALRM, previous)
        torch.set_num_threads(threads)
    report.seconds = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per case")
    parser.add_argument(
        "--mem-gb",
        type=float,
        default=3.0,
        help="address space allowed beyond startup (more than the 1 GB hole, which is mapped)",
    )
    parser.add_argument("--replay", type=int, help="run one case and show its traceback")
    args = parser.parse_args(argv)
    _limit_address_space(args.mem_gb)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.replay is not None:
            seeds = make_seeds(folder / "seeds")
            rng = random.Random(f"{args.seed}:{args.replay}")
            s = rng.choice(seeds)
            files, ops, hole = mutate(s, rng)
            print(f"case {args.replay}: {s.name}: {ops}")
            print(load_and_generate(write_case(folder, s, files, hole=hole)))
            return 0
        report = fuzz(cases=args.cases, seed=args.seed, folder=folder, timeout=args.timeout)
    print(report.summary())
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
