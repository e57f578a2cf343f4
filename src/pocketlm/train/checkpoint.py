"""Training checkpoints on disk, written so that a kill at any instant leaves a good one.

    RUN_DIR/checkpoints/
      step-000010/state.pt     model (trainable tensors), optimizer, scheduler, RNG, step
      step-000020/state.pt
      latest                   "step-000020"

A checkpoint is written into a hidden temporary folder, fsynced, and renamed to its final
`step-N` name (a rename within a folder is atomic); then `latest` is replaced atomically
(temp file + `os.replace`), and only then are older checkpoints deleted. A reader follows
`latest`, so it sees the previous whole checkpoint or the new whole one, never a partial
one. `state.pt` is read with `torch.load(weights_only=True)`: tensors and plain values
only, never arbitrary pickled objects. Knows nothing of models or training loops.
"""

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from pocketlm.errors import PocketLMError
from pocketlm.paths import as_umask_allows

STATE = "state.pt"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, state: dict[str, Any], *, step: int, keep: int = 1) -> Path:
    """Write `state` as the checkpoint of `step` and point `latest` at it."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        with open(work / STATE, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        as_umask_allows(work, folder=True)
        if final.exists():  # the same step saved twice (Ctrl-C right after a save)
            shutil.rmtree(final)
        os.replace(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_text_atomic(root / LATEST, final.name + "\n")
    _prune(root, keep=[final.name, *_newest(root, keep)])
    return final


def latest(run_dir: Path) -> Path | None:
    """The folder of the newest complete checkpoint, or None when there is none."""
    pointer = checkpoints_dir(run_dir) / LATEST
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    folder = pointer.parent / name
    return folder if _STEP_DIR.match(name) and (folder / STATE).is_file() else None


def load(folder: Path) -> dict[str, Any]:
    file = Path(folder) / STATE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise PocketLMError(
            f"checkpoint {file} cannot be read ({error.__class__.__name__}: {error})"
        ) from None


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        as_umask_allows(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _newest(root: Path, keep: int) -> list[str]:
    steps = sorted((p.name for p in root.iterdir() if _STEP_DIR.match(p.name)), reverse=True)
    return steps[:keep]


def _prune(root: Path, *, keep: list[str]) -> None:
    """Delete older checkpoints and temporary folders a killed writer left behind."""
    for path in root.iterdir():
        old_step = _STEP_DIR.match(path.name) and path.name not in keep
        if old_step or (path.name.startswith(".tmp-") and path.is_dir()):
            shutil.rmtree(path, ignore_errors=True)
