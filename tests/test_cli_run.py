"""`pocketlm run` as a user types it: streaming, --stats, stdin, and bad input that must
end in one line on stderr and a non-zero exit, never a traceback."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pocketlm
from checkpoints import make_gpt2
from pocketlm.cli.main import main

POCKETLM = str(Path(sys.executable).with_name("pocketlm"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_gpt2(tmp_path_factory.mktemp("tiny")))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_prints_the_continuation_and_stats(capsys, tiny):
    expected = (
        pocketlm.load(tiny).generate("Alice was beginning to", max_tokens=10, temperature=0).text
    )
    code, out, err = run(
        capsys, "run", tiny, "Alice was beginning to", "-n", "10", "-t", "0", "--stats"
    )
    assert code == 0
    assert out == expected + "\n"
    assert "prompt tokens: 4" in err and "new tokens: 10" in err and "tokens/s" in err


def test_prompt_from_stdin_in_a_real_process(tiny):
    """Also: POCKETLM_THREADS, --stats' start-up line, and --show-probs in a pipe."""
    expected = pocketlm.load(tiny).generate("Hello from a pipe\n", max_tokens=6, temperature=0).text
    result = subprocess.run(
        [POCKETLM, "run", tiny, "-n", "6", "-t", "0", "--stats", "--show-probs"],
        input="Hello from a pipe\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "POCKETLM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"  # no colour codes into the pipe
    assert "\033[" not in result.stderr
    assert "--show-probs colours the text on a terminal only" in result.stderr
    startup = re.search(
        r"threads: 1 \(POCKETLM_THREADS\)  load: ([\d.]+) s  start to first token: ([\d.]+) s",
        result.stderr,
    )
    assert startup, result.stderr
    # the process started before the load began (Python, importing torch...)
    assert 0 < float(startup[1]) < float(startup[2])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "no-such-model-anywhere", "Hi"], "unknown model 'no-such-model-anywhere'"),
        (["run", "{tiny}", "Hi", "-n", "0"], "max_tokens must be at least 1"),
        (["run", "{tiny}", "Hi", "-t", "-0.5"], "temperature must be >= 0"),
        (["run", "{tiny}", "Hi", "--top-p", "1.2"], "top_p must be in (0, 1]"),
        (["run", "{tiny}", "   "], "the prompt is empty"),
        (["run", "{tiny}", "Hi", "--logit-bias", "abc"], "--logit-bias item 'abc'"),
        (["run", "./missing-folder/", "Hi"], "no such file or folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(capsys, tiny, argv, message):
    code, out, err = run(capsys, *[a.format(tiny=tiny) for a in argv])
    assert code == 1
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_weights_in_a_real_process(tmp_path):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    result = subprocess.run(
        [POCKETLM, "run", str(folder), "Hi"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "has no model.safetensors" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_options_may_sit_between_model_and_prompt(capsys, tiny):
    expected = pocketlm.load(tiny).generate("Options in between", max_tokens=5, temperature=0).text
    code, out, _ = run(capsys, "run", tiny, "-n", "5", "-t", "0", "Options in between")
    assert code == 0 and out == expected + "\n"
    with pytest.raises(SystemExit):
        main(["run", tiny, "Hi", "--no-such-flag"])
