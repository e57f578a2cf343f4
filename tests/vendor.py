"""Third-party test material from PyPI, fetched once per machine and hash-checked.

- llama.cpp's own files, from the llama-cpp-python sdist (its `vendor/llama.cpp/`):
  `models/ggml-vocab-*.gguf` (vocabulary-only GGUFs) with `.inp`/`.out` golden
  tokenizations made by llama.cpp itself, `models/templates/*.jinja`, and
  `convert_hf_to_gguf.py` + `gguf-py` (HF folder -> GGUF, as users make them).
- Real tokenizer files for the sentencepiece / tiktoken oracles: Mistral 7B's
  SentencePiece models (mistral-common wheel) and Llama 3's tiktoken BPE (llama-models wheel).

Each archive is downloaded with pip (no dependencies, no build), its sha256 checked, and
only the files asked for are unpacked into the cache: $POCKETLM_TEST_CACHE, or
~/.cache/pocketlm-tests. Nothing here is committed to the repository. A download that
fails (no network) skips the tests that need it with the reason.
"""

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

# (requirement, pip options, archive file name, sha256)
ARCHIVES = {
    "llama.cpp": (
        "llama-cpp-python==0.3.36",
        ["--no-binary", ":all:"],
        "llama_cpp_python-0.3.36.tar.gz",
        "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    ),
    "mistral-common": (
        "mistral-common==1.13.1",
        [],
        "mistral_common-1.13.1-py3-none-any.whl",
        "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
    ),
    "llama-models": (
        "llama-models==0.3.0",
        [],
        "llama_models-0.3.0-py3-none-any.whl",
        "7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f",
    ),
}


def cache_dir() -> Path:
    root = os.environ.get("POCKETLM_TEST_CACHE") or Path.home() / ".cache" / "pocketlm-tests"
    return Path(root)


@functools.cache
def archive(name: str) -> Path:
    """The downloaded, hash-checked archive `name` of ARCHIVES (skips the test without it)."""
    requirement, options, file_name, sha256 = ARCHIVES[name]
    path = cache_dir() / "archives" / file_name
    if not path.is_file() or _sha256(path) != sha256:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                       "--disable-pip-version-check", *options, requirement, "-d", tmp]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
            got = Path(tmp) / file_name
            if done.returncode != 0 or not got.is_file():
                pytest.skip(f"cannot download {requirement}: {done.stderr.strip()[-300:]}")
            if (digest := _sha256(got)) != sha256:
                raise AssertionError(f"{file_name}: sha256 {digest}, expected {sha256}")
            os.replace(got, path)
    return path


def unpacked(name: str, prefix: str) -> Path:
    """The members of archive `name` under `prefix` (a folder inside it), unpacked once
    into the cache; returns that folder."""
    target = cache_dir() / "unpacked" / name / prefix
    marker = target / ".complete"
    if marker.is_file():
        return target
    source = archive(name)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _extract(source, prefix, partial)
    marker_tmp = partial / ".complete"
    marker_tmp.write_text("ok\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def llama_cpp() -> Path:
    """llama.cpp's source folder (vendor/llama.cpp of the llama-cpp-python sdist), with
    models/ (vocab GGUFs, golden tokenizations, templates), convert_hf_to_gguf.py and gguf-py."""
    return unpacked("llama.cpp", "llama_cpp_python-0.3.36/vendor/llama.cpp")


def mistral_tokenizers() -> Path:
    """mistral-common's data folder: tokenizer.model.v1 (Mistral 7B v0.1, SentencePiece,
    32,000 pieces), mistral_instruct_tokenizer_240323.model.v3 (32,768), tekken_*.json."""
    return unpacked("mistral-common", "mistral_common/data")


def llama3_tokenizer() -> Path:
    """Llama 3's tiktoken BPE file (128,000 ranks + specials), from llama-models."""
    return unpacked("llama-models", "llama_models/llama3") / "tokenizer.model"


def golden_vocabs() -> list[Path]:
    """Every vocab GGUF that has golden tokenizations beside it (`.inp` and `.out`)."""
    models = llama_cpp() / "models"
    return sorted(p for p in models.glob("ggml-vocab-*.gguf") if Path(f"{p}.out").is_file())


def _extract(source: Path, prefix: str, into: Path) -> None:
    """Members under `prefix` of a .tar.gz or .whl, written below `into` without the prefix
    (names that would leave `into` are refused)."""
    prefix = prefix.rstrip("/") + "/"
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as z:
            for info in z.infolist():
                if info.filename.startswith(prefix) and not info.is_dir():
                    _write(into, info.filename[len(prefix) :], z.read(info))
        return
    with tarfile.open(source) as tar:
        for member in tar:
            if member.name.startswith(prefix) and member.isfile():
                _write(into, member.name[len(prefix) :], tar.extractfile(member).read())


def _write(root: Path, relative: str, data: bytes) -> None:
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise AssertionError(f"archive member {relative!r} leaves the folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def keep_compiled_kernels(store: Path) -> None:
    """Point a compiled-step store's kernel folder (pocketlm.generate.precompiled's
    inductor_dir) at one kept in the cache, so that the C++ kernels of a test's compiled
    step are compiled once per machine, as a user's are once (most of a cold compile
    here); the steps themselves are still made anew in `store`."""
    from pocketlm.generate import precompiled

    kept = cache_dir() / "compiled-kernels"
    kept.mkdir(parents=True, exist_ok=True)
    folder = precompiled.inductor_dir(Path(store))
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.symlink_to(kept, target_is_directory=True)
