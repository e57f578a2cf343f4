"""Reading the user's text files and writing output files, for the feature subcommands.

A text file must be UTF-8 (one clear line when it is not); an output file is written
to a temporary file beside it and moved into place with `os.replace`, so a reader
never sees half a file and a failed run leaves the old one intact. Knows nothing of
models.
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pocketlm.errors import PocketLMError
from pocketlm.paths import as_umask_allows


def read_text(path: str | Path) -> str:
    """The whole file as text; a missing, unreadable or non-UTF-8 file is a user error."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PocketLMError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PocketLMError(f"{path} is a folder, not a text file") from None
    except OSError as error:
        raise PocketLMError(f"cannot read {path}: {error.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PocketLMError(
            f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "convert it, e.g. with iconv -t UTF-8"
        ) from None


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temporary file in `path`'s folder, then move it to `path`."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise PocketLMError(f"cannot write {path}: the folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
        as_umask_allows(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
