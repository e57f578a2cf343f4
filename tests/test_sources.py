"""Model sources: names and paths -> local checkpoints, hub downloads against a fake hub.

The hub is `tests/fakehub.py` on 127.0.0.1 (HF_ENDPOINT); huggingface_hub itself is the
real library, unmocked, downloading into a private HF cache (HF_HOME). Nothing here
reaches the network.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from fakehub import FakeHub, make_tiny_gpt2
from pocketlm import paths
from pocketlm.errors import CorruptModelError, ModelNotFoundError, PocketLMError
from pocketlm.weights import catalog, sources

LOADED_FILES = {"config.json", "model.safetensors", "vocab.json", "merges.txt"}


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def hub(tmp_path, hf_home, pocketlm_home, monkeypatch):
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.add_repo("someorg/tiny-gpt2", make_tiny_gpt2(tmp_path / "repos" / "tiny"))
        yield server


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- hub downloads -----------------------------------------------------------------------


def test_resolve_downloads_into_the_standard_hf_cache(hub, hf_home, tmp_path):
    path = sources.resolve("someorg/tiny-gpt2")
    commit = hub.commit("someorg/tiny-gpt2")
    assert path == hf_home / "hub" / "models--someorg--tiny-gpt2" / "snapshots" / commit
    assert {p.name for p in path.iterdir()} == LOADED_FILES  # no .bin, README, onnx/
    source = tmp_path / "repos" / "tiny"
    for name in LOADED_FILES:
        assert (path / name).read_bytes() == (source / name).read_bytes()
    assert ("GET", f"/someorg/tiny-gpt2/resolve/{commit}/pytorch_model.bin") not in hub.requests


def test_hf_hub_cache_env_is_honoured(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    path = sources.resolve("someorg/tiny-gpt2")
    assert path.parent.parent == tmp_path / "elsewhere" / "models--someorg--tiny-gpt2"


def test_second_resolve_offline_needs_no_server(hub):
    first = sources.resolve("someorg/tiny-gpt2")
    hub.stop()
    assert sources.resolve("someorg/tiny-gpt2", offline=True) == first


def test_hf_hub_offline_env_means_no_requests(hub, monkeypatch):
    first = sources.resolve("someorg/tiny-gpt2")
    count = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sources.resolve("someorg/tiny-gpt2") == first
    assert len(hub.requests) == count


def test_offline_uncached_model_is_a_clear_error(hub):
    with pytest.raises(ModelNotFoundError) as caught:
        sources.resolve("gpt2", offline=True)
    assert str(caught.value) == (
        "model 'gpt2' is not in the Hugging Face cache; run without --offline to download it"
    )
    assert hub.requests == []


def test_catalogue_alias_downloads_its_hub_repo(hub, tmp_path):
    hub.add_repo("openai-community/gpt2", make_tiny_gpt2(tmp_path / "repos" / "gpt2"))
    path = sources.resolve("gpt2")
    assert path.parent.parent.name == "models--openai-community--gpt2"
    assert (path / "config.json").is_file()


def test_pytorch_bin_only_repo_says_so(hub, tmp_path):
    folder = tmp_path / "repos" / "old"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    hub.add_repo("someorg/old-gpt2", folder)
    with pytest.raises(PocketLMError, match=r"only has PyTorch \.bin weights"):
        sources.resolve("someorg/old-gpt2")
    # The same answer offline, from the cached file listing.
    with pytest.raises(PocketLMError, match=r"only has PyTorch \.bin weights"):
        sources.resolve("someorg/old-gpt2", offline=True)


def test_unknown_hub_repo(hub):
    with pytest.raises(ModelNotFoundError, match="'someorg/missing' was not found on the Hugging"):
        sources.resolve("someorg/missing")


def test_unreachable_hub_is_one_line(hf_home, pocketlm_home, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    with pytest.raises(PocketLMError) as caught:
        sources.resolve("someorg/tiny-gpt2")
    message = str(caught.value)
    assert "could not reach the Hugging Face hub" in message and "\n" not in message


# --- names and paths ---------------------------------------------------------------------


def test_unknown_name_points_at_pocketlm_models(hf_home, pocketlm_home):
    with pytest.raises(ModelNotFoundError, match="`pocketlm models`"):
        sources.resolve("no-such-model")


def test_default_model_missing_says_how_to_pull(pocketlm_home):
    with pytest.raises(ModelNotFoundError, match="run `pocketlm pull smollm2-135m`"):
        sources.resolve(None)
    with pytest.raises(ModelNotFoundError, match="run `pocketlm pull smollm2-135m`"):
        sources.resolve("smollm2-135m")


def test_existing_paths_resolve_to_themselves(tmp_path, pocketlm_home):
    folder = make_tiny_gpt2(tmp_path / "tiny")
    assert sources.resolve(str(folder)) == folder
    gguf = tmp_path / "one" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert sources.resolve(str(gguf)) == gguf
    assert sources.resolve(str(gguf.parent)) == gguf  # a folder with one .gguf
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        sources.resolve(str(tmp_path / "absent.gguf"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CorruptModelError, match="not a .gguf"):
        sources.resolve(str(tmp_path / "notes.txt"))


def test_a_model_folder_in_the_cwd_wins_over_the_name(tmp_path, pocketlm_home, monkeypatch):
    make_tiny_gpt2(tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)
    assert sources.resolve("gpt2") == Path("gpt2")


def test_store_names_resolve_to_folder_or_gguf(pocketlm_home, tmp_path):
    hf_style = make_tiny_gpt2(paths.model_store() / "my-finetune")
    assert sources.resolve("my-finetune") == hf_style
    gguf = paths.model_store() / "mine" / "weights.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert sources.resolve("mine") == gguf
    (paths.model_store() / "broken").mkdir()
    with pytest.raises(CorruptModelError, match="pocketlm rm broken"):
        sources.resolve("broken")


def test_looks_like_model(pocketlm_home, tmp_path):
    (paths.model_store() / "mine").mkdir(parents=True)
    for word in ("gpt2", "GPT2-XL", "smollm2-135m", "mine", "someorg/some-model"):
        assert sources.looks_like_model(word), word
    for word in ("Once upon a time", "hello", "what is 1/2 of 4?", "a/b/c"):
        assert not sources.looks_like_model(word), word


def test_catalogue_lookup_by_name_or_repo_id():
    assert catalog.lookup("gpt2-xl").repo_id == "openai-community/gpt2-xl"
    assert catalog.lookup("Qwen/Qwen2.5-0.5B-Instruct").name == "qwen2.5-0.5b-instruct"
    assert catalog.lookup(catalog.DEFAULT_MODEL).wheel == catalog.SMOLLM2_WHEEL
    assert catalog.lookup("nope") is None


def test_cached_hub_models_lists_causal_lms(hub):
    assert sources.cached_hub_models() == []
    path = sources.resolve("someorg/tiny-gpt2")
    assert sources.cached_hub_models() == [("someorg/tiny-gpt2", path)]


def test_env_is_read_at_call_time_not_import_time(hub):
    # huggingface_hub.constants froze HF_ENDPOINT/HF_HOME when first imported; we must not.
    from huggingface_hub import constants

    assert hub.url != constants.ENDPOINT
    assert sources.hub_endpoint() == hub.url
    assert sources.hf_cache_dir() == Path(os.environ["HF_HOME"]) / "hub"


def test_pull_command_downloads_a_hub_repo(hub, capsys):
    from pocketlm.cli.main import main

    assert main(["pull", "someorg/tiny-gpt2"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.parent.parent.name == "models--someorg--tiny-gpt2"
    assert {p.name for p in path.iterdir()} == LOADED_FILES


def _pull_in(hub, *, tty: bool) -> tuple[str, str]:
    """`pocketlm pull someorg/tiny-gpt2` run as a user runs it: in a pseudo-terminal
    (stdout and stderr both the screen), or with both into pipes. (screen, "") or (out, err)."""
    env = {**os.environ, "TERM": "dumb", "COLUMNS": "120"}
    command = str(Path(sys.executable).with_name("pocketlm"))
    if not tty:
        done = subprocess.run([command, "pull", "someorg/tiny-gpt2"], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout, done.stderr
    child = pexpect.spawn(command, ["pull", "someorg/tiny-gpt2"], env=env, encoding="utf-8",
                          timeout=120, dimensions=(24, 120))  # fmt: skip
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return child.before, ""


def test_pull_shows_a_byte_bar_on_a_terminal_and_none_into_a_pipe(hub):
    """The progress bar a person sees: the bytes of the files pocketlm loads (the fake
    hub's own sizes, as tqdm writes them), up to 100%, closed before the path is printed
    on a line of its own. Into pipes (a log, a script): the path alone, no bar, no \\r."""
    from tqdm import tqdm

    sizes = {name: info["size"] for name, info in hub.files("someorg/tiny-gpt2").items()}
    total = tqdm.format_sizeof(sum(sizes[name] for name in LOADED_FILES)) + "B"
    screen, _ = _pull_in(hub, tty=True)
    assert "100%" in screen and f"{total} / {total}" in screen
    path = screen.rstrip().split("\r\n")[-1]
    assert path.endswith(hub.commit("someorg/tiny-gpt2")) and Path(path).is_dir()
    assert "\x1b" not in screen.split("\r\n")[-2] + path  # no bar drawn over the path

    shutil.rmtree(os.environ["HF_HOME"])  # so that it downloads again
    out, err = _pull_in(hub, tty=False)
    assert out == path + "\n"
    assert not re.search(r"[\r\x1b]|%\|", out + err), err  # no bar, no control characters
