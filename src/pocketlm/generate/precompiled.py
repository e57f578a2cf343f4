"""The compiled decode step kept on disk, so that a later process loads it instead of
compiling it again (`--compile`'s second run).

What a plain torch.compile redoes at every start, even with inductor's on-disk caches
warm, is Dynamo's trace of the model and the guards it builds (SmolLM2-135M, cached:
10 s of bytecode tracing and 1 s of guards in a 25 s compile at load ~8). PyTorch's
ahead-of-time compile (`torch.compile(...).aot_compile(example inputs)`, experimental in
2.13) keeps all of it: the traced graph, its guards, the bytecode that calls it and
inductor's generated code, which `torch.compiler.load_compiled_function` turns back
into the step. The C++ kernels inductor generated for it are compiled once into
inductor's cache; that cache is kept beside the files (not under /tmp, which a reboot
clears), or loading recompiles every kernel (~40 s here).

A file is named by everything the graph was specialised to and its guards may not all
check: the torch and Python versions, the CPU's vector ISA, the number of threads (its
C++ loops are written for it, so each count `--threads` or the load-aware default picks
has a file of its own), the model's structure (module types and their plain
attributes), its tensors' names, shapes and dtypes (not their values: those are the
graph's inputs, so a fine-tune of the same shapes shares it), its config, the KV cache's
shape. A file holds one step per kind of input met (a sliding window's step past the
window is another graph); their guards, less the model's own, choose between them. On
loading, the source of every function the trace went through is compared with today's,
as PyTorch's own precompile does; a file that is stale or unreadable is compiled again.
Files are written whole, then renamed into place.

Knows nothing of tokens, sampling or where pocketlm keeps its files (the caller says).
(PyTorch: docs `torch.compiler_aot_compile`, torch/_dynamo/package.py `CompilePackage`.)
"""

import contextlib
import hashlib
import importlib
import inspect
import io
import logging
import os
import pickle
import platform
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from pocketlm.models.cache import KVCache

log = logging.getLogger("pocketlm")

SUFFIX = ".pt2"
_SCALARS = (bool, int, float, str, type(None))


def folder_for(store: Path) -> Path:
    """Where this torch keeps its compiled steps under `store` (one folder per version,
    so an upgrade leaves the old ones to delete as a whole)."""
    return store / f"torch-{torch.__version__}"


def inductor_dir(store: Path) -> Path:
    """Inductor's cache of compiled C++ kernels, which a loaded step links against."""
    return store / "inductor"


def key(model: nn.Module, cache: KVCache) -> str:
    """A digest of everything a compiled decode step of `model` on `cache` depends on."""
    digest = hashlib.sha256()
    parts = [
        torch.__version__,
        platform.python_version(),
        torch.backends.cpu.get_cpu_capability(),
        # inductor writes the thread count into its C++ loops, and Dynamo guards on it
        f"threads={torch.get_num_threads()}",
        os.environ.get("POCKETLM_KERNELS", ""),  # whether pocketlm's C++ kernels may run
        repr(getattr(model, "config", None)),
        repr((cache.rows, cache.slots, cache.k[0].dtype, str(cache.device), len(cache.k))),
    ]
    for name, module in model.named_modules():
        plain = sorted((k, repr(v)) for k, v in vars(module).items() if _plain(v))
        parts.append(f"{name}:{type(module).__module__}.{type(module).__qualname__}:{plain}")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        parts.append(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{tensor.device}")
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def _plain(value: object) -> bool:
    """A module attribute the key reads: a scalar, or a tuple of them (not a tensor)."""
    if isinstance(value, tuple):
        return all(map(_plain, value))
    return isinstance(value, _SCALARS)


def path_for(store: Path, model: nn.Module, cache: KVCache) -> Path:
    family = type(model).__name__.lower()
    return folder_for(store) / f"decode-{family}-{key(model, cache)}{SUFFIX}"


@contextlib.contextmanager
def inductor_files(store: Path) -> Iterator[None]:
    """Inductor's cache in `store` while a step is compiled or loaded (and first run)."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    folder = inductor_dir(store)
    folder.mkdir(parents=True, exist_ok=True)
    with temporary_cache_dir(str(folder)):
        yield


def load(path: Path) -> list[Callable]:
    """The compiled steps saved at `path` (one per kind of input met), or [] where there
    are none that can be used (said in the log; they are then compiled again)."""
    if not path.is_file():
        return []
    try:
        steps = [
            torch.compiler.load_compiled_function(io.BytesIO(data))
            for data in pickle.loads(path.read_bytes())
        ]
        stale = next(filter(None, map(_changed_sources, steps)), None)
    # A cache that cannot be read, for whatever reason (another torch, a truncated file,
    # a class that moved), is only a cache: compile again.
    except Exception as error:  # noqa: BLE001
        log.warning("the compiled step in %s cannot be used (%s): compiling again", path, error)
        return []
    if stale:
        log.info("the compiled step in %s was made from other code (%s): compiling again",
                 path, stale)  # fmt: skip
        return []
    for step in steps:
        step.disable_guard_check()  # the caller checks them (`takes`) before each call
    log.info("loaded the compiled decode step from %s", path)
    return steps


def compile_step(fn: Callable, args: tuple) -> Callable:
    """`fn` compiled ahead of time for `args` (fullgraph, shapes static but for the dims
    marked dynamic), its guards kept but for those on the model's own modules and tensors
    (the file's key stands for those): the rest are cheap enough to check at every call."""
    graph = torch.compile(fn, dynamic=False, fullgraph=True,
                          options={"guard_filter_fn": _keep_guards})  # fmt: skip
    step = graph.aot_compile((args, {}))
    step.disable_guard_check()
    return step


def takes(step: Callable, args: tuple) -> bool:
    """Whether a compiled step was made for inputs of this kind (its guards pass)."""
    return step.guard_check(*args)


def save(steps: list[Callable], path: Path) -> None:
    """Write `steps` to `path` whole (a temporary file in its folder, then renamed), or
    say in the log why not (a full disk, a read-only home: then there is no cache)."""
    temporary = None
    try:
        data = pickle.dumps([type(step).serialize(step).serialized_data for step in steps])
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as file:
            temporary = file.name
            file.write(data)
        os.replace(temporary, path)
    except (OSError, RuntimeError, pickle.PicklingError) as error:
        log.warning("the compiled step could not be saved in %s (%s)", path, error)
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
    else:
        log.info("saved the compiled decode step in %s", path)


def _keep_guards(entries: list) -> list[bool]:
    """Which guards a saved step keeps: those PyTorch can serialize, on the step's own
    inputs (tokens, positions, the cache, the slots, the thread count) -- not the
    model's, which are most of them and are what the file's key stands for."""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES
    return [
        not (e.is_global or e.guard_type in unsupported or e.name.startswith("L['model']"))
        for e in entries
    ]


def _changed_sources(step: object) -> str | None:
    """The first function the step's trace went through whose source is not the same now
    (module and lines), or None. The same check as torch/_dynamo/package.py's."""
    for code in step.source_info().inlined_sources:
        module = importlib.import_module(code.module)
        lines = inspect.getsourcelines(module)[0][code.firstlineno - 1 : code.lastlineno - 1]
        if hashlib.sha256("".join(lines).encode()).hexdigest() != code.checksum:
            return f"{code.module}, lines {code.firstlineno}-{code.lastlineno}"
    return None
