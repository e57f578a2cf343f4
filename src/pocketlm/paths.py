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


def sessions_dir() -> Path:
    return home() / "sessions"


def history_file() -> Path:
    return home() / "history"
