"""GGUF files -> what a Hugging Face checkpoint gives: an HF-style config dict and a state dict.

`read_gguf` parses the header (metadata and tensor table) and builds the config.json-style
dict (the key mapping lives in `gguf_config.py`); `gguf_tensors` dequantizes the tensors to
torch one at a time, renamed to our parameter names (`gguf_state_dict`: all in one dict);
`gguf_raw_tensors` hands out the undecoded blocks of those the loader keeps quantized.
So one loader path serves safetensors folders and GGUF files alike.

The header parser is our own rather than gguf-py's `GGUFReader`: model files are untrusted
input, and every count and length here is checked against the bytes that remain before
anything is read or allocated, so a corrupt file ends in one `CorruptModelError`, never
in a multi-GB allocation or a crash. Tensors are read from a memory map.

The name tables (GGUF tensor -> ours, with its shape) are in `gguf_tables.py`. Knows
nothing of the model classes beyond their parameter names and shapes. References:
the GGUF spec (ggml/docs/gguf.md), llama.cpp's `gguf-py/gguf/tensor_mapping.py` and
`convert_hf_to_gguf.py` (whose Llama q/k row permutation and Gemma norm offset are undone
here), and
transformers' `modeling_gguf_pytorch_utils.py`, which does the same.
"""

import math
import re
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from pocketlm.errors import CorruptModelError, ModelNotFoundError, PocketLMError
from pocketlm.kernels.gguf import STORED_TYPES, packed_bytes
from pocketlm.weights import gguf_tables
from pocketlm.weights.dequant import dequantize, ggml_type_name, ggml_type_sizes
from pocketlm.weights.gguf_config import PERMUTED_QK, gguf_config, quantization

SUPPORTED_ARCHITECTURES = ("gpt2", "llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma",
                           "gemma2", "gemma3", "phi3", "smollm3", "olmo2", "granite",
                           "stablelm", "starcoder2", "gptneox", "falcon", "gpt-oss")  # fmt: skip

# Llama 3.1+ rope scaling as llama.cpp's converter writes it: per-pair divisors of the
# rotary frequencies, read into the config (rope_scaling "freq_factors"), not a parameter.
# llama.cpp reads it for these architectures only.
ROPE_FREQS = "rope_freqs.weight"
_ROPE_FREQS_ARCHS = ("llama",)
_MAX_ROPE_FREQS = 1 << 15  # one per pair of the largest head_dim the validator allows
# Phi-3's LongRoPE as the converter writes it: its long and short per-pair divisors, read
# into the config (rope_scaling "longrope"), not parameters.
ROPE_FACTORS = {"long_factor": "rope_factors_long.weight",
                "short_factor": "rope_factors_short.weight"}  # fmt: skip

# llama.cpp's converter adds 1 to every Gemma RMSNorm weight (HF stores weight - 1 and its
# GemmaRMSNorm scales by 1 + weight; llama.cpp's norm scales by the weight); pocketlm keeps
# HF's form, so 1 is taken off again (in fp32: these are F32 in every conversion).
_UNIT_OFFSET_NORMS = ("gemma", "gemma2", "gemma3")

# --- the GGUF container ---------------------------------------------------------------

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_DEPTH = 3
_MAX_DIM = 1 << 62
# Caps far above any real model (vocabularies reach ~256K tokens, 500K merges), so that a
# corrupt count in a multi-GB file cannot make the parser build GBs of Python objects.
_MAX_ENTRIES = 1 << 16  # metadata keys, and tensors
_MAX_ARRAY_LEN = 1 << 22
_MAX_STRINGS = 1 << 21  # strings and nested arrays in all of the metadata
_MAX_STRING = 1 << 26  # bytes; chat templates and embedded tokenizer.json are far smaller
_MAX_KEY, _MAX_TENSOR_NAME = 65535, 64  # the GGUF spec's limits
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")  # the header's own little-endian ints
# GGUF value type -> numpy dtype; 7 is a bool, 8 a string, 9 an array
_STRING, _ARRAY, _BOOL = 8, 9, 7
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
            10: "<u8", 11: "<i8", 12: "<f8"}  # fmt: skip
_MIN_SIZE = {**{t: np.dtype(d).itemsize for t, d in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table. `shape` is outermost first, like torch's."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclass
class GGUFCheckpoint:
    """A parsed GGUF header: metadata, the HF-style config, and the tensor table."""

    path: Path
    metadata: dict[str, Any]
    architecture: str
    config: dict[str, Any]
    quantization: str
    tensors: dict[str, GGUFTensorInfo] = field(default_factory=dict, repr=False)
    file_size: int = 0


def _corrupt_file(path: Path, what: str) -> NoReturn:
    raise CorruptModelError(
        f"{path} is not a valid GGUF file ({what}); "
        "download it again or re-convert it with llama.cpp"
    )


class _Cursor:
    """Bounds-checked little-endian reads over the file's bytes."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.path, self.pos, self.end = buf, path, 0, len(buf)
        self.strings_left = _MAX_STRINGS

    def fail(self, what: str) -> NoReturn:
        _corrupt_file(self.path, f"{what}, at byte {self.pos}")

    def take(self, n: int, what: str) -> int:
        if n > self.end - self.pos:
            self.fail(f"{what} needs {n} bytes but the file ends after {self.end - self.pos}")
        start, self.pos = self.pos, self.pos + n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.take(8, what))[0]

    def string(self, what: str, *, limit: int = _MAX_STRING) -> str:
        n = self.u64(f"length of {what}")
        if n > limit:
            self.fail(f"{what} is {n} bytes long, more than the {limit} pocketlm accepts")
        start = self.take(n, what)
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what, depth)
        if vtype not in _SCALARS:
            self.fail(f"{what} has unknown value type {vtype}")
        return self.numbers(vtype, 1, what)[0]

    def numbers(self, vtype: int, count: int, what: str) -> list[Any]:
        dtype = np.dtype(_SCALARS[vtype])
        start = self.take(count * dtype.itemsize, what)
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=start).tolist()
        return [bool(v) for v in values] if vtype == _BOOL else values

    def array(self, what: str, depth: int) -> list[Any]:
        etype, count = self.u32(f"element type of {what}"), self.u64(f"length of {what}")
        if etype not in _MIN_SIZE:
            self.fail(f"{what} has unknown element type {etype}")
        if etype == _ARRAY and depth >= _MAX_ARRAY_DEPTH:
            self.fail(f"{what} nests arrays too deeply")
        if count > (self.end - self.pos) // _MIN_SIZE[etype]:
            self.fail(f"{what} declares {count} elements, more than the file can hold")
        if count > _MAX_ARRAY_LEN:
            self.fail(f"{what} declares {count} elements, more than pocketlm accepts")
        if etype in (_STRING, _ARRAY):
            self.strings_left -= count
            if self.strings_left < 0:
                self.fail(f"{what} brings the metadata to more strings than pocketlm accepts")
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        return self.numbers(etype, count, what)


def _parse_header(cur: _Cursor) -> tuple[dict[str, Any], list[tuple[str, int, list[int], int]]]:
    """Magic, version, metadata and the raw tensor table; leaves the cursor after it."""
    start = cur.take(4, "magic")
    magic = bytes(cur.buf[start : start + 4])
    if magic != _MAGIC:
        cur.fail(f"it starts with {magic!r}, not {_MAGIC!r}")
    version = cur.u32("version")
    if version not in _VERSIONS:
        if version.to_bytes(4, "little")[::-1] in (v.to_bytes(4, "little") for v in _VERSIONS):
            cur.fail("it is a big-endian GGUF, which pocketlm does not read")
        cur.fail(f"GGUF version {version} is not one of {_VERSIONS}")
    n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
    # Smallest possible entries: key (8 + 0) + type 4 + 1 byte; name 8 + dims 4 + type 4 + offset 8.
    if n_kv > (cur.end - cur.pos) // 13 or n_tensors > (cur.end - cur.pos) // 24:
        cur.fail(f"it declares {n_kv} metadata entries and {n_tensors} tensors, more than fit")
    if max(n_kv, n_tensors) > _MAX_ENTRIES:
        cur.fail(f"it declares {n_kv} metadata entries and {n_tensors} tensors, too many")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key", limit=_MAX_KEY)
        if key in metadata:
            cur.fail(f"metadata key {key!r} appears twice")
        metadata[key] = cur.value(cur.u32(f"type of {key!r}"), repr(key))
    table, names = [], set()
    for _ in range(n_tensors):
        name = cur.string("tensor name", limit=_MAX_TENSOR_NAME)
        if name in names:
            cur.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            cur.fail(f"tensor {name!r} has {n_dims} dimensions")
        dims = [cur.u64(f"dimensions of {name!r}") for _ in range(n_dims)]
        if any(d > _MAX_DIM for d in dims):
            cur.fail(f"tensor {name!r} has a negative or absurd dimension in {dims}")
        table.append((name, cur.u32(f"type of {name!r}"), dims, cur.u64(f"offset of {name!r}")))
    return metadata, table


def _tensor_infos(
    path: Path, *, metadata: dict[str, Any], table: list, header_end: int, file_size: int
) -> dict[str, GGUFTensorInfo]:
    """Check every tensor's type, alignment and extent against the file; absolute offsets."""
    alignment = metadata.get("general.alignment", 32)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        _corrupt_file(path, f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-header_end // alignment) * alignment
    infos: dict[str, GGUFTensorInfo] = {}
    for name, type_id, dims, offset in table:
        type_name = ggml_type_name(type_id)
        if type_name is None:
            _corrupt_file(path, f"tensor {name!r} has unknown ggml type {type_id}")
        block_size, type_size = ggml_type_sizes(type_name)
        if dims[0] % block_size:
            _corrupt_file(
                path, f"tensor {name!r} rows of {dims[0]} are not whole {type_name} blocks"
            )
        n_bytes = math.prod(dims) // block_size * type_size
        if offset % alignment or data_start + offset + n_bytes > file_size:
            where = f"{n_bytes} bytes at data offset {offset}"
            _corrupt_file(path, f"tensor {name!r} ({where}) lies outside the file or is misaligned")
        shape = tuple(reversed(dims))  # GGUF lists the innermost dimension first
        infos[name] = GGUFTensorInfo(name, type_name, shape, data_start + offset, n_bytes)
    return infos


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Parse a GGUF file's header into metadata, an HF-style config and its tensor table.

    Cheap: tensor data is not touched, but for the few bytes of `rope_freqs.weight`
    (which the config carries). Raises `CorruptModelError` for a malformed file and
    `PocketLMError` for an architecture pocketlm does not run.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {path} does not exist")
    size = path.stat().st_size
    if size < 24:
        raise CorruptModelError(f"{path} is too short ({size} bytes) to be a GGUF file")
    try:
        data = np.memmap(path, mode="r")
    except OSError as e:
        raise PocketLMError(f"cannot read {path}: {e.strerror or e}") from e
    cur = _Cursor(memoryview(data), path)
    metadata, table = _parse_header(cur)
    tensors = _tensor_infos(
        path, metadata=metadata, table=table, header_end=cur.pos, file_size=size
    )
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        _corrupt_file(path, "general.architecture is missing")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise PocketLMError(
            f"{path} holds a {arch!r} model, which pocketlm does not run; "
            f"supported GGUF architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    rope_freqs = _rope_freqs(path, data, tensors) if arch in _ROPE_FREQS_ARCHS else None
    longrope = None
    if arch == "phi3" and any(name in tensors for name in ROPE_FACTORS.values()):
        longrope = {key: _rope_freqs(path, data, tensors, name=name) or []
                    for key, name in ROPE_FACTORS.items()}  # fmt: skip
    config = gguf_config(
        arch, metadata, tensors=tensors, path=path, rope_freqs=rope_freqs, longrope=longrope
    )
    return GGUFCheckpoint(
        path=path,
        metadata=metadata,
        architecture=arch,
        config=config,
        quantization=quantization(metadata, tensors),
        tensors=tensors,
        file_size=size,
    )


def _rope_freqs(
    path: Path, data: np.memmap, tensors: dict[str, GGUFTensorInfo], *, name: str = ROPE_FREQS
) -> list | None:
    """The values of `rope_freqs.weight` (or of LongRoPE's factors, `name`): one per rotated
    pair (the config validator checks their count and range), or None without one."""
    info = tensors.get(name)
    if info is None:
        return None
    if len(info.shape) != 1 or info.shape[0] > _MAX_ROPE_FREQS:  # read before any check
        _corrupt_file(path, f"tensor {name!r} has shape {info.shape}, not one per pair")
    raw = data[info.offset : info.offset + info.n_bytes]
    return dequantize(raw, info.ggml_type, shape=info.shape, tensor_name=info.name).tolist()


# --- tensors --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Planned:
    ours: str
    info: GGUFTensorInfo
    unpermute_heads: int | None  # undo llama.cpp's rotary row interleave over this many heads
    offset: float = 0.0  # added to the values (Gemma's norms: -1, see _UNIT_OFFSET_NORMS)
    rows: np.ndarray | None = None  # our row i is the file's row rows[i] (fused q/k/v)


def _plan(ckpt: GGUFCheckpoint) -> list[_Planned]:
    """Map every GGUF tensor to our name; check names, layer indices, shapes and the key set."""
    cfg, gpt2 = ckpt.config, ckpt.architecture == "gpt2"
    table = gguf_tables.table(ckpt.architecture, cfg)
    n_layers = cfg["n_layer"] if gpt2 else cfg["num_hidden_layers"]
    dims = gguf_tables.dims(cfg)
    rows = gguf_tables.qkv_rows(cfg) if ckpt.architecture in ("gptneox", "falcon") else None
    # Which block tensors each layer has (a MoE's dense layers differ), worked out once.
    layer_templates = [gguf_tables.layer_templates(cfg, i, table) for i in range(n_layers)]
    plan = []
    for name, info in ckpt.tensors.items():
        if name == ROPE_FREQS and ckpt.architecture in _ROPE_FREQS_ARCHS:
            continue  # read into the config by `read_gguf`
        if name in ROPE_FACTORS.values() and ckpt.architecture == "phi3":
            continue  # the same
        m = re.fullmatch(r"blk\.(0|[1-9]\d{0,8})\.(.+)", name)
        template = f"blk.{{i}}.{m[2]}" if m else name
        if (
            template not in table
            or (m and int(m[1]) >= n_layers)
            or (m and template not in layer_templates[int(m[1])])
        ):
            where = f"a {n_layers}-layer {ckpt.architecture} model"
            _corrupt_tensor(ckpt, name, f"is not part of {where}")
        ours, symbols = table[template]
        want = tuple(dims[d] for d in symbols)
        if info.shape != want:
            _corrupt_tensor(ckpt, name, f"has shape {info.shape}, expected {want}")
        if m:
            ours = ours.replace("{i}", m[1]) if isinstance(ours, str) else [
                o.replace("{i}", m[1]) for o in ours
            ]  # fmt: skip
        if "{e}" in str(ours):  # all of a layer's experts: one matrix (or bias) each
            plan += [_Planned(o, i, None) for o, i in _expert_matrices(info, ours)]
        else:
            unit_offset = ckpt.architecture in _UNIT_OFFSET_NORMS and template.endswith(
                "norm.weight"
            )
            fused = rows if template.startswith("blk.{i}.attn_qkv.") else None
            heads = _permuted_heads(ckpt, template)
            plan.append(_Planned(ours, info, heads, -1.0 * unit_offset, fused))
    have = {p.ours for p in plan}
    for i, templates in enumerate(layer_templates):
        for template in templates:
            if template in gguf_tables.FUSED_FFN:
                continue
            ours = table[template][0].replace("{i}", str(i)).replace("{e}", "0")
            if ours not in have and not gguf_tables.OPTIONAL.fullmatch(ours):
                _corrupt_tensor(ckpt, template.replace("{i}", str(i)), "is missing")
    for template, (ours, _) in table.items():
        if "{i}" not in template and ours not in have and not gguf_tables.OPTIONAL.fullmatch(ours):
            _corrupt_tensor(ckpt, template, "is missing")
    return plan


def _expert_matrices(
    info: GGUFTensorInfo, ours: str | list[str]
) -> list[tuple[str, GGUFTensorInfo]]:
    """A 3-D expert tensor (experts, rows, cols) as (our name, the info of one expert's
    matrix): its bytes are the e-th of `experts` equal slices (the e-th half of that
    again, for each of gate and up in a fused tensor). A 2-D one (experts, rows) holds a
    bias per expert (GPT-OSS), taken apart the same way."""
    names = [ours] if isinstance(ours, str) else ours
    experts, rows, *cols = info.shape
    per_expert = info.n_bytes // experts
    per_part, part_rows = per_expert // len(names), rows // len(names)
    return [
        (
            name.replace("{e}", str(e)),
            GGUFTensorInfo(
                f"{info.name} (expert {e})",
                info.ggml_type,
                (part_rows, *cols),
                info.offset + e * per_expert + j * per_part,
                per_part,
            ),
        )
        for e in range(experts)
        for j, name in enumerate(names)
    ]


def _permuted_heads(ckpt: GGUFCheckpoint, template: str) -> int | None:
    """How many heads llama.cpp interleaved this tensor's rows over (k: the KV heads)."""
    if ckpt.architecture not in PERMUTED_QK:
        return None
    if template.startswith("blk.{i}.attn_q."):
        return ckpt.config["num_attention_heads"]
    if template.startswith("blk.{i}.attn_k."):
        return ckpt.config["num_key_value_heads"]
    return None


def _corrupt_tensor(ckpt: GGUFCheckpoint, name: str, what: str) -> NoReturn:
    raise CorruptModelError(
        f"{ckpt.path}: tensor {name!r} {what}; the file is damaged or not a standard "
        f"llama.cpp {ckpt.architecture} conversion"
    )


def _unpermute(x: Any, n_heads: int) -> Any:
    """Undo convert_hf_to_gguf's `permute`: rows (head, pair, 2) -> HF's (head, 2, pair).

    llama.cpp interleaves each head's two rotary halves; HF's rotate_half keeps them apart.
    Works on torch tensors and numpy arrays whose first axis is the rows.
    """
    rows = x.shape[0]
    return x.reshape(n_heads, rows // n_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _check_unchanged(ckpt: GGUFCheckpoint) -> None:
    """Refuse a file that changed since `read_gguf` read its header."""
    try:
        size = ckpt.path.stat().st_size
    except OSError as e:
        raise PocketLMError(f"cannot read {ckpt.path}: {e.strerror or e}") from e
    if size != ckpt.file_size:
        raise CorruptModelError(f"{ckpt.path} changed size while being loaded; load it again")


def _tensor_bytes(ckpt: GGUFCheckpoint, info: GGUFTensorInfo) -> np.memmap:
    """One tensor's bytes, mapped on their own: once the array (and what views it) is
    dropped, its pages leave the process, so a load holds the file a tensor at a time
    beside what it builds, never the whole file beside all of it."""
    try:
        return np.memmap(ckpt.path, mode="r", offset=info.offset, shape=(info.n_bytes,))
    except (OSError, ValueError) as e:
        raise PocketLMError(f"cannot read {ckpt.path}: {getattr(e, 'strerror', None) or e}") from e


def gguf_tensors(
    ckpt: GGUFCheckpoint, *, dtype: torch.dtype = torch.float32, skip: Collection[str] = ()
) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, tensor dequantized to `dtype`) one at a time, in nn.Linear layout, for
    every tensor but those named in `skip` (which a loader takes undecoded instead).

    Llama q/k rows are put back in Hugging Face's rotate_half order. Tied models have no
    lm_head.weight (the model ties it to the embedding).
    """
    plan = _plan(ckpt)
    _check_unchanged(ckpt)
    for p in plan:
        if p.ours in skip:
            continue
        raw = _tensor_bytes(ckpt, p.info)
        # An offset is applied in fp32: 1 + w rounded to bf16 first would lose w's bits.
        t = dequantize(
            raw, p.info.ggml_type, shape=p.info.shape, tensor_name=p.info.name,
            dtype=torch.float32 if p.offset else dtype,
        )  # fmt: skip
        if p.offset:
            t = (t + p.offset).to(dtype)
        if p.rows is not None:
            t = t[torch.from_numpy(p.rows)]
        yield p.ours, _unpermute(t, p.unpermute_heads).contiguous() if p.unpermute_heads else t


def gguf_state_dict(
    ckpt: GGUFCheckpoint, *, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Every tensor of `gguf_tensors`, in one dict."""
    return dict(gguf_tensors(ckpt, dtype=dtype))


def gguf_raw_tensors(ckpt: GGUFCheckpoint) -> dict[str, tuple[str, np.ndarray, tuple[int, ...]]]:
    """Our name -> (ggml type, undecoded bytes, logical shape), for quantized-weight loaders.

    The bytes come as a read-only uint8 memory map of each tensor alone (see
    `_tensor_bytes`: drop an entry once used), shaped (*shape[:-1], bytes per row), so a
    row's blocks are contiguous (Q8_0: view as (..., row / 32, 34)). Llama q/k rows are
    already un-permuted; those few arrays are copies instead of maps.
    """
    plan = _plan(ckpt)
    _check_unchanged(ckpt)
    out = {}
    for p in plan:
        info = p.info
        if p.offset:  # a norm (never kept undecoded): its values need the offset applied
            continue
        block_size, type_size = ggml_type_sizes(info.ggml_type)
        row_bytes = info.shape[-1] // block_size * type_size
        raw = _tensor_bytes(ckpt, info).reshape(*info.shape[:-1], row_bytes)
        if p.unpermute_heads and len(info.shape) == 1:  # a bias: permute its elements
            if block_size != 1:
                _corrupt_tensor(ckpt, info.name, f"is a 1-D {info.ggml_type} tensor")
            rows = _unpermute(raw.reshape(info.shape[0], type_size), p.unpermute_heads)
            raw = np.ascontiguousarray(rows).reshape(raw.shape)
        elif p.unpermute_heads:
            raw = np.ascontiguousarray(_unpermute(raw, p.unpermute_heads))
        if p.rows is not None and len(info.shape) == 1:  # a fused bias: reorder its elements
            if block_size != 1:
                _corrupt_tensor(ckpt, info.name, f"is a 1-D {info.ggml_type} tensor")
            raw = raw.reshape(info.shape[0], type_size)[p.rows].reshape(raw.shape)
        elif p.rows is not None:
            raw = raw[p.rows]  # a copy, not a map: the rows of a fused q/k/v regrouped
        out[p.ours] = (info.ggml_type, raw, info.shape)
    return out


def type_mix(ckpt: GGUFCheckpoint) -> list[tuple[str, int]]:
    """(ggml type, bytes of the file's tensors of that type), largest first: a Q4_K_M
    file is mostly Q4_K with some Q6_K, and its norms in F32."""
    mix: dict[str, int] = {}
    for info in ckpt.tensors.values():
        mix[info.ggml_type] = mix.get(info.ggml_type, 0) + info.n_bytes
    return sorted(mix.items(), key=lambda item: -item[1])


def stored_bytes(ckpt: GGUFCheckpoint) -> int:
    """Bytes of weights the default load holds: each matrix of a type pocketlm's kernels
    take as it is stored (kernels.gguf.packed_bytes), every other tensor in float32."""
    total = 0
    for info in ckpt.tensors.values():
        if len(info.shape) in (2, 3) and info.ggml_type in STORED_TYPES:
            # A 3-D tensor holds a layer's experts, each kept as a matrix of its own.
            n_matrices = math.prod(info.shape[:-2])
            total += n_matrices * packed_bytes(info.ggml_type, (info.shape[-2], info.shape[-1]))
        else:
            total += 4 * math.prod(info.shape)
    return total
