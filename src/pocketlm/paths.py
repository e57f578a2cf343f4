"""Where pocketlm keeps its files on this machine.

`POCKETLM_HOME` overrides everything (the tests point it at a temporary folder);
otherwise the XDG data directory, `~/.local/share/pocketlm`. Knows nothing of models.
"""

import os
from pathlib import Path


def home() -> Path:
    """The root of pocketlm's own files (model store, history, sessions)."""
    if env := os.environ.get("POCKETLM_HOME"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(xdg) / "pocketlm"


def model_store() -> Path:
    """Models that `pocketlm pull` and `pocketlm finetune` put on disk, one folder or file each."""
    return home() / "models"


def runs_dir() -> Path:
    """Fine-tune runs (`pocketlm finetune --out NAME`): runs/NAME holds the checkpoint."""
    return home() / "runs"


def compiled_dir() -> Path:
    """`--compile`'s compiled decode steps, one file per model shape and torch version,
    and inductor's compiled kernels they use (pocketlm.generate.precompiled)."""
    return home() / "compiled"


def sessions_dir() -> Path:
    return home() / "sessions"


def history_file() -> Path:
    return home() / "history"


def umask() -> int:
    """This process's umask (read from /proc where it can be, so nothing changes it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # the only portable way to read it is to set it...
    os.umask(mask)  # ...and put it back
    return mask


def as_umask_allows(path: str | Path, *, folder: bool = False) -> None:
    """Give a file from `tempfile.mkstemp` (made 0600) or a folder from `mkdtemp` (0700)
    the permissions that `open` or `mkdir` would have given it (0666 or 0777 less the
    umask), before it is renamed into place as an output the user asked for."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())
