"""Whether a model fits, asked before loading it: the memory a load will hold against what
the machine (and the process's cgroup, as in a container) has free.

A load that cannot fit is refused with one line naming the need and the lighter ways to
load the same model that would fit, instead of being killed by the kernel half way.
Knows nothing of torch or model files: callers bring the byte counts.
"""

import ctypes
from pathlib import Path

from pocketlm.errors import PocketLMError
from pocketlm.weights.card import human_bytes

# Beside the weights: Python, torch and its kernels, the tokenizer and the first blocks of
# the KV cache. (`pocketlm run` on SmolLM2 as stored: 250 MB of RSS over its 100 MB of
# weights.)
FIXED_OVERHEAD = 300 * 2**20
_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def available_bytes() -> int | None:
    """Memory this process can still take: the kernel's MemAvailable, lowered by a
    cgroup limit less the cgroup's usage; None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (
        (_CGROUP_V2 / "memory.max", _CGROUP_V2 / "memory.current"),
        (_CGROUP_V1 / "memory.limit_in_bytes", _CGROUP_V1 / "memory.usage_in_bytes"),
    ):
        try:
            cap = int(limit.read_text())  # "max" (no limit) is not a number
            found.append(max(cap - int(usage.read_text()), 0))
            break
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def check_fits(what: str, need: int, *, lighter: dict[str, int]) -> None:
    """Refuse (PocketLMError) when `need` bytes of weights (plus FIXED_OVERHEAD) exceed the
    memory available. `lighter`: other ways to load the model -> their bytes; those that
    would fit are named in the message."""
    free = available_bytes()
    if free is None or need + FIXED_OVERHEAD <= free:
        return
    options = [f"{how} ({human_bytes(size)})" for how, size in lighter.items()
               if size + FIXED_OVERHEAD <= free]  # fmt: skip
    advice = "free some memory, or choose a smaller model or a smaller quantization of it"
    if options:
        *rest, last = options
        advice = f"load it with {', '.join(rest)} or {last}" if rest else f"load it with {last}"
    raise PocketLMError(
        f"{what} needs about {human_bytes(need + FIXED_OVERHEAD)} of memory and "
        f"{human_bytes(free)} is available; {advice}"
    )


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim). A load frees
    many large temporaries (repacked rows, fused matrices' parts); glibc keeps their
    pages, which would count in the process's memory as if still in use (SmolLM2 as
    stored: 295 MB of RSS over the interpreter's, 207 MB after a trim)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to do
        return
    libc.malloc_trim(0)
