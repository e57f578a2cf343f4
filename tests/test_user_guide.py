"""What the README promises a newcomer, checked as written: its greedy examples give the
output it shows, `run PROMPT` is a chat turn for an instruct model (`--raw` continues the
text), its transformers snippet loads a fine-tune, a fine-tune's run folder can be cleaned
with `rm`, a bf16 export is bf16, and the server's default `max_tokens`.

The oracles: the README's own text (parsed here, so an edited example is an edited test),
the real SmolLM2 GGUF as a user gets it, transformers on the exported folder, and
`lm.generate` for the server's tokens."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

import pocketlm
from checkpoints import make_gpt2
from pocketlm.cli.interactive import few_shot_from_args
from pocketlm.cli.main import build_parser, main
from pocketlm.cli.run import answer, split_model_and_prompt
from pocketlm.serve import DEFAULT_MAX_TOKENS
from pocketlm.serve.app import Service, create_app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
POCKETLM = str(Path(sys.executable).with_name("pocketlm"))
LOCAL = "http://127.0.0.1"  # a Host the server accepts (TestClient's own is "testserver")


def code_blocks(language: str = "") -> list[str]:
    """The README's fenced code blocks opened with ```LANGUAGE (plain: ``` alone)."""
    blocks, lines, inside, wanted = [], [], False, False
    for line in README.splitlines():
        if not inside and line.startswith("```"):
            inside, wanted, lines = True, line == "```" + language, []
        elif inside and line == "```":
            inside = False
            if wanted:
                blocks.append("\n".join(lines))
        elif inside:
            lines.append(line)
    return blocks


def shown_runs() -> list[tuple[str, str]]:
    """Every `$ pocketlm run ...` in the README's plain code blocks with the output shown
    under it (the lines up to the next `$` or the end of the block)."""
    examples = []
    for block in code_blocks():
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("$ pocketlm run "):
                continue
            output = []
            for following in lines[i + 1 :]:
                if following.startswith("$ "):
                    break
                output.append(following)
            examples.append((line[2:], "\n".join(output)))
    return examples


def run_args(command: str):
    """The command's arguments as `pocketlm` parses them."""
    argv = shlex.split(command)[1:]
    args, extra = build_parser("run").parse_known_args(argv)
    args.words += extra
    return args


def test_the_readme_shows_greedy_examples_that_reproduce(smollm2_stored, capsys, monkeypatch):
    examples = [(c, out) for c, out in shown_runs() if not c.endswith(" -t 0")]  # not the REPL
    # The chat turn, the raw completion and the three few-shot examples.
    assert len(examples) >= 5, examples
    monkeypatch.chdir(ROOT)  # the examples name examples/*.jsonl relative to the checkout
    for command, shown in examples:
        args = run_args(command)
        assert args.temperature == 0, f"{command}: an example that shows output must be greedy"
        model, prompt = split_model_and_prompt(args.words, args.model)
        assert model is None and prompt, command  # the default model, as the README runs it
        assert answer(smollm2_stored, prompt, args, shots=few_shot_from_args(args)) == 0
        assert capsys.readouterr().out == shown + "\n", command


def test_run_answers_an_instruct_model_as_a_chat_turn_and_raw_continues(smollm2_gguf, tmp_path):
    """In a real process, as typed: the instruct model answers the question (its chat
    template around it), and --raw continues the same words as text."""
    env = {**os.environ, "POCKETLM_HOME": str(tmp_path)}
    question = [POCKETLM, "run", str(smollm2_gguf), "-t", "0", "-n", "12"]
    result = subprocess.run([*question, "What is the capital of Japan?"],
                            capture_output=True, text=True, env=env, timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "The capital of Japan is Tokyo.\n"
    result = subprocess.run([*question, "--raw", "--system", "Be brief.", "Hi"],
                            capture_output=True, text=True, env=env, timeout=180)  # fmt: skip
    assert result.returncode == 1 and result.stderr == (
        "error: --system is for a chat turn: drop it, or drop --raw / --examples\n"
    )


# -- the server's default max_tokens --


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return pocketlm.load(make_gpt2(tmp_path_factory.mktemp("tiny"), n_positions=1024))


def test_a_request_without_max_tokens_gets_the_servers_default(tiny_lm):
    never_end = {"logit_bias": {"50256": -100}, "temperature": 0}  # random weights: no EOS
    chat = {"messages": [{"role": "user", "content": "Hi"}], **never_end}
    with TestClient(create_app(Service(tiny_lm, name="tiny")), base_url=LOCAL) as client:
        reply = client.post("/v1/chat/completions", json=chat).json()
        assert reply["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS == 512
        assert reply["choices"][0]["finish_reason"] == "length"
    expected = tiny_lm.generate("The dog", max_tokens=5, temperature=0, logit_bias={50256: -100})
    with TestClient(
        create_app(Service(tiny_lm, name="tiny", max_tokens=5)), base_url=LOCAL
    ) as client:
        assert client.post("/v1/chat/completions", json=chat).json()["usage"] == {
            "prompt_tokens": reply["usage"]["prompt_tokens"],
            "completion_tokens": 5,
            "total_tokens": reply["usage"]["prompt_tokens"] + 5,
        }
        # null is "not said" too; the text is what the engine gives for that budget.
        body = {"prompt": "The dog", "max_tokens": None, **never_end}
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == (
            expected.text
        )
        # A legacy completion that leaves max_tokens out gets OpenAI's 16; asking wins.
        body = {"prompt": "The dog", **never_end}
        assert client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 16
        asked = client.post("/v1/chat/completions", json={**chat, "max_tokens": 7}).json()
        assert asked["usage"]["completion_tokens"] == 7


def test_serve_max_tokens_is_shown_and_checked_before_loading(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "(default 512;" in re.sub(r"\s+", " ", capsys.readouterr().out)
    assert main(["serve", "no-such-model", "--max-tokens", "0"]) == 1
    assert capsys.readouterr().err == "error: --max-tokens must be at least 1\n"


# -- a fine-tune: where it goes, the README's transformers snippet, rm, a bf16 export --


@pytest.fixture
def user_home(tmp_path, monkeypatch) -> Path:
    """A HOME of its own, with pocketlm's files where they go by default (no POCKETLM_HOME),
    so `~/.local/share/pocketlm/...` in the README means this test's folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("POCKETLM_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    return tmp_path


def readme_snippet(containing: str) -> str:
    (block,) = [b for b in code_blocks("python") if containing in b]
    return block


def test_a_fine_tune_loads_with_the_readme_snippet_and_rm_cleans_its_run(
    user_home, tmp_path, capsys
):
    base = make_gpt2(tmp_path / "base", n_positions=64)
    data = tmp_path / "poems.txt"
    data.write_text("The moon over the harbour shines on the boats.\n" * 40)
    store = user_home / ".local/share/pocketlm"
    argv = ["finetune", str(base), str(data), "--out", "poet", "--steps", "2", "--batch-size",
            "2", "--block-size", "16", "--eval-every", "0", "--export-dtype", "bf16"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    folder, run = store / "models/poet", store / "runs/poet"
    assert (run / "checkpoints").is_dir() and (run / "metrics.jsonl").is_file()

    # The README's snippet, as written: `~` expanded, transformers loads the bf16 export.
    namespace: dict = {}
    exec(readme_snippet("AutoModelForCausalLM"), namespace)  # noqa: S102 - the README's own code
    model = namespace["model"]
    assert model.dtype == torch.bfloat16
    assert namespace["tokenizer"]("Hello world").input_ids == [15496, 995]  # a sane oracle
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(folder / "model.safetensors").values()} == {torch.bfloat16}
    ids = torch.tensor([[464, 3290, 318, 257]])
    lm = pocketlm.load("poet")
    with torch.no_grad():
        theirs = model.float()(ids).logits[0]
        ours = lm.model(ids, torch.arange(4)[None])[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    assert main(["rm", "poet", "--run-only"]) == 0
    assert "removed the run folder" in capsys.readouterr().out
    assert not run.exists() and folder.is_dir()
    assert main(["rm", "poet", "--run-only"]) == 1
    assert "no fine-tune run 'poet'" in capsys.readouterr().err
    assert main(["rm", "poet"]) == 0
    assert capsys.readouterr().out.startswith("removed poet (")
    assert not folder.exists()
