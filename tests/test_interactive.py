"""The interactive prompt and `pocketlm chat`, driven as a person would: through a real
pseudo-terminal (pexpect), typing lines, pressing Ctrl-C and Ctrl-D, reading the screen."""

import json
import math
import os
import re
import sys
from pathlib import Path

import pexpect
import pytest

from pocketlm.cli.interactive import paint, parse_setting
from pocketlm.cli.main import main
from pocketlm.errors import PocketLMError
from pocketlm.generate.stream import Chunk
from pocketlm.tokenizer import Tokenizer
from pocketlm.weights.gguf import read_gguf
from scripted_model import make_scripted_gpt2

POCKETLM = str(Path(sys.executable).with_name("pocketlm"))
PROMPT = ">>> "
TIMEOUT = 120  # seconds for any one screen to appear (a loaded 2-core machine is slow)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """A GPT-2 that answers "Assistant:" with " Hel" "lo" "!" then "\\nUser:", and after
    " tick" says " tack" " tick" ... forever (see scripted_model.py)."""
    return make_scripted_gpt2(
        tmp_path_factory.mktemp("interactive") / "gpt2",
        [":", " Hel", "lo", "!", "\n", "User", ":"],
        [" tick", " tack", " tick"],
    )


def spawn(args: list[str], home: Path) -> pexpect.spawn:
    env = {**os.environ, "POCKETLM_HOME": str(home), "TERM": "dumb", "COLUMNS": "200"}
    child = pexpect.spawn(POCKETLM, args, env=env, encoding="utf-8", timeout=TIMEOUT,
                          dimensions=(40, 200))  # fmt: skip
    child.expect_exact(PROMPT)
    return child


def type_line(child: pexpect.spawn, line: str) -> str:
    """Type a line, wait for the next prompt, return what the screen showed in between."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    shown = child.before.replace("\r\n", "\n")
    return shown.split("\n", 1)[1] if "\n" in shown else ""  # drop the echoed input line


def test_streamed_answer_ctrl_c_stops_it_and_a_second_ctrl_c_leaves(scripted, tmp_path):
    child = spawn(["run", str(scripted), "-t", "0", "-n", "100000"], tmp_path)
    assert "completion mode" in child.before
    child.sendline("tick tack tick")
    # An endless answer: text on the screen while it is still being generated is streaming.
    child.expect_exact(" tack tick tack tick")
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)
    # The prompt works again after the interruption: multi-line input, both ways.
    child.sendline("/set max_tokens 3")
    child.expect_exact("max_tokens = 3")
    child.expect_exact(PROMPT)
    child.sendline('"""tick')
    child.expect_exact("... ")
    child.sendline('tack tick"""')
    child.expect_exact(" tack tick tack\r\n")
    child.expect_exact(PROMPT)
    stats = type_line(child, "/stats")
    tokens = len(Tokenizer.gpt2().encode("tick\ntack tick"))
    assert f"prompt tokens {tokens} " in stats and "new tokens 3" in stats
    assert re.search(r"threads \d+ \(.*\)  model load [\d.]+ s", stats), stats
    child.sendline("tick \\")
    child.expect_exact("... ")
    child.sendline("tack tick")
    child.expect_exact(" tack tick tack\r\n")
    child.expect_exact(PROMPT)
    tokens = len(Tokenizer.gpt2().encode("tick \ntack tick"))
    assert f"prompt tokens {tokens} " in type_line(child, "/stats")
    child.sendintr()
    child.expect_exact("Ctrl-C again or Ctrl-D to leave")
    child.expect_exact(PROMPT)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    # readline history, kept in pocketlm's data folder.
    assert "tick tack tick" in (tmp_path / "history").read_text()


def test_chat_set_save_load_and_quit(scripted, tmp_path):
    child = spawn(["chat", str(scripted), "-t", "0", "-n", "16", "--show-probs"], tmp_path)
    assert "chat mode (transcript harness)" in child.before
    # --show-probs: the scripted model is sure of every token (p ~ 1): green, then reset.
    shown = type_line(child, "Say hello.")
    assert shown == "\x1b[32mHel\x1b[0m\x1b[32mlo\x1b[0m\x1b[32m!\x1b[0m\n"
    assert type_line(child, "/probs").strip() == "probabilities off"
    assert type_line(child, "/set temperature 0.5").strip() == "temperature = 0.5"
    assert (
        type_line(child, "/set temperature hot").strip()
        == "error: temperature needs a number (got 'hot')"
    )
    assert "must be in [-2, 2]" in type_line(child, "/set presence_penalty 5")
    assert "unknown setting 'warmth'" in type_line(child, "/set warmth 1")
    assert "unknown command /sav" in type_line(child, "/sav s1")
    assert type_line(child, "/save s1").startswith("saved session s1")
    saved = json.loads((tmp_path / "sessions" / "s1.json").read_text())
    assert saved["settings"]["temperature"] == 0.5 and saved["mode"] == "chat"
    assert saved["conversation"]["turns"] == [{"user": "Say hello.", "assistant": " Hello!"}]
    assert saved["show_probs"] is False
    assert not [p for p in (tmp_path / "sessions").iterdir() if p.name != "s1.json"]  # no temp left
    type_line(child, "/clear")
    type_line(child, "/set temperature 0.9")
    type_line(child, "/mode completion")
    assert "loaded session s1: 1 turns, chat mode" in type_line(child, "/load s1")
    shown = type_line(child, "/show")
    assert "temperature         0.5" in shown and "turns               1 (0 dropped)" in shown
    assert "no saved session 'nope'" in type_line(child, "/load nope")
    assert "session names are" in type_line(child, "/save ../x")
    # The loaded conversation goes on. Loaded from text, its reply is re-encoded as " Hello"
    # "!" while the cache holds the model's own " Hel" "lo" "!": from there on it is computed.
    assert type_line(child, "Again.").strip() == "Hello!"
    gpt2 = Tokenizer.gpt2()
    new = len(gpt2.encode(" Hello!")) + len(gpt2.encode("\nUser: Again.\nAssistant:"))
    assert f"({new} computed" in type_line(child, "/stats")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_reads_messages_from_a_pipe(scripted, tmp_path, monkeypatch, capsys):
    read, write = os.pipe()
    os.write(write, b"Say hello.\n/set max_tokens 2\nSay hello.\n")
    os.close(write)
    monkeypatch.setattr(sys, "stdin", os.fdopen(read))
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path))
    # No prompt, banner or history on a pipe: just the replies, one a line.
    assert main(["chat", str(scripted), "-t", "0", "-n", "16"]) == 0
    assert capsys.readouterr().out == "Hello!\nmax_tokens = 2\nHello\n"
    assert not (tmp_path / "history").exists()


# Not "What is the capital of France?": there the 135M model's first token is a near tie
# (fp32: "The" 0.08 logits above "L"), which the default path's rounding of activations
# (int8 per 32, as llama.cpp) turns into "L'Étoile, la Marseillaise...".
def test_smollm2_chat_answers_paris_and_computes_only_the_new_turn(smollm2_gguf, tmp_path):
    child = spawn(["chat", str(smollm2_gguf), "-t", "0", "-n", "24"], tmp_path)
    assert "chat mode (chat template)" in child.before
    assert "Paris" in type_line(child, "Which city is the capital of France?")
    type_line(child, "/set max_tokens 1")
    type_line(child, "And of Germany?")
    # The reply ended with <|im_end|>, sampled but never fed back: it and the new turn are
    # all that is computed; the system prompt, question and answer come from the cache.
    tail = "<|im_end|>\n<|im_start|>user\nAnd of Germany?<|im_end|>\n<|im_start|>assistant\n"
    new = len(
        Tokenizer.from_gguf_metadata(read_gguf(smollm2_gguf).metadata).encode(tail, add_bos=False)
    )
    stats = type_line(child, "/stats")
    assert f"({new} computed" in stats, stats
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_probability_colours_and_setting_values():
    assert paint(Chunk("a", 1, math.log(0.85))) == "\x1b[32ma\x1b[0m"
    assert paint(Chunk("a", 1, math.log(0.6))) == "\x1b[33ma\x1b[0m"
    assert paint(Chunk("a", 1, math.log(0.3))) == "\x1b[35ma\x1b[0m"
    assert paint(Chunk("a", 1, math.log(0.1))) == "\x1b[31ma\x1b[0m"
    assert paint(Chunk("", finish_reason="stop")) == ""
    assert parse_setting("seed", "none") is None and parse_setting("seed", "7") == 7
    assert parse_setting("logit_bias", "50256:-100,13:2.5") == {50256: -100.0, 13: 2.5}
    assert parse_setting("stop", "\\nUser:") == ["\nUser:"]
    assert parse_setting("top_k", "40") == 40
    with pytest.raises(PocketLMError, match="top_k needs a whole number"):
        parse_setting("top_k", "0.5")
