"""Conversations: transcript harness and chat template, stopping at the next user turn, KV
cache reuse counted in prefilled tokens, dropping old turns, sessions as data."""

import logging

import pytest
import torch

import pocketlm
from checkpoints import hf_model
from pocketlm.errors import PocketLMError
from pocketlm.prompting.chat import Conversation, Harness, Turn
from scripted_model import make_scripted_gpt2

SHORT = Harness(intro="A chat.", examples=(("Hi", "Hello."),))


def stats_of(chunks):
    """The statistics a stream brings back on its last chunk."""
    return list(chunks)[-1].stats


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """A GPT-2 that answers every "Assistant:" with " Hel" "lo" "!" (a split of " Hello!"
    the tokenizer would never make) and then starts the next "\\nUser:" line; after " tick"
    it says " tack" " tick" ... forever."""
    folder = make_scripted_gpt2(
        tmp_path_factory.mktemp("chat") / "gpt2",
        [":", " Hel", "lo", "!", "\n", "User", ":"],
        [" tick", " tack", " tick"],
        n_positions=256,
    )
    return folder


def fresh(folder, **options) -> Conversation:
    return Conversation(pocketlm.load(folder, device="cpu"), **options)


def test_harness_renders_the_transcript_exactly():
    turns = [Turn("What is 2+2?", " 4.")]
    assert SHORT.render(system=None, turns=turns, message="And 3+3?") == (
        "A chat.\n\nUser: Hi\nAssistant: Hello.\nUser: What is 2+2?\nAssistant: 4.\n"
        "User: And 3+3?\nAssistant:"
    )
    renamed = Harness(intro="", user="Q", assistant="Bot", examples=())
    assert renamed.render(system="Be brief.", turns=[], message="hi") == "Be brief.\n\nQ: hi\nBot:"
    assert renamed.stops == ["\nQ:"]


def test_a_base_model_gets_the_harness_and_stops_at_the_next_user_turn(scripted):
    conv = fresh(scripted)
    assert not conv.uses_template and conv.harness == Harness()
    prompt = conv.render("Say hello.")
    # The oracle: transformers, greedy on the same weights, goes on into the next turn.
    ids = torch.tensor([conv.lm.tokenizer.encode(prompt)])
    out = hf_model(scripted).generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert conv.lm.tokenizer.decode(out[0, ids.shape[1] :].tolist()) == " Hello!\nUser: Hello"
    chunks = list(conv.send("Say hello.", max_tokens=16, temperature=0))
    assert "".join(c.text for c in chunks) == "Hello!"  # the space after "Assistant:" is not shown
    assert conv.turns == [Turn("Say hello.", " Hello!")]
    assert chunks[-1].stats.new_tokens == 6  # " Hel" "lo" "!" "\n" "User" ":"


def test_each_turn_prefills_only_its_new_tokens(scripted):
    tokenizer = pocketlm.load(scripted, device="cpu").tokenizer
    counts = {}
    for reuse_ids in (True, False):
        conv = fresh(scripted, reuse_ids=reuse_ids)
        first = stats_of(conv.send("Say hello.", max_tokens=16, temperature=0))
        assert first.prefilled_tokens == first.prompt_tokens  # an empty cache: all of it
        again = stats_of(conv.send("Again?", max_tokens=16, temperature=0))
        counts[reuse_ids] = again.prefilled_tokens
    tail = tokenizer.encode("\nUser: Again?\nAssistant:")
    # The cache already holds the reply's " Hel" "lo" "!" and the "\n" "User" the model
    # generated before the stop string completed: only the rest of the tail is new.
    assert counts[True] == len(tail) - 2
    # Re-encoding the text spells the reply " Hello" "!" instead, so the common prefix ends
    # where the reply starts and the reply is computed again.
    reply = tokenizer.encode(" Hello!")
    assert counts[False] == len(reply) + len(tail)


def test_oldest_turns_are_dropped_and_the_user_told_once(scripted, caplog):
    conv = fresh(scripted, harness=SHORT, system="Be nice.")
    max_tokens = 200  # leaves 56 tokens of the 256 for the prompt
    with caplog.at_level(logging.WARNING, logger="pocketlm"):
        for n in range(7):
            stats = stats_of(conv.send(f"message {n}", max_tokens=max_tokens, temperature=0))
            prompt_tokens = stats.prompt_tokens
            assert prompt_tokens + max_tokens <= conv.lm.context_length == 256
    assert 0 < conv.dropped_turns < 6 and len(conv.turns) == 7
    prompt = conv.render("next")
    assert prompt.startswith("Be nice.\n\nUser: Hi\nAssistant: Hello.\nUser: message ")
    assert "message 0\n" not in prompt and "User: message 6\nAssistant: Hello!\n" in prompt
    warnings = [r for r in caplog.records if "outgrew" in r.getMessage()]
    assert len(warnings) == 1


def test_a_message_that_cannot_fit_is_refused_in_one_line(scripted):
    conv = fresh(scripted, harness=SHORT)
    with pytest.raises(PocketLMError, match="does not fit the 256-token context"):
        list(conv.send("word " * 300, max_tokens=8))
    with pytest.raises(PocketLMError, match="empty"):
        list(conv.send("  "))
    assert conv.turns == []


def test_a_reply_cut_short_is_kept_and_the_next_turn_extends_it(scripted):
    conv = fresh(scripted, harness=Harness(assistant="Clock", examples=()))
    # "...Clock:" -> " Hel"...: send, then stop reading after two pieces, as Ctrl-C does.
    stream = conv.send("hi", max_tokens=50, temperature=0)
    assert [next(stream).text, next(stream).text] == ["Hel", "lo"]
    stream.close()
    assert conv.turns == [Turn("hi", " Hello")]
    stats = stats_of(conv.send("again", max_tokens=16, temperature=0))
    tail = conv.lm.tokenizer.encode("\nUser: again\nClock:")
    # The cache holds " Hel" (" lo" was sampled but never fed back): "lo" + tail is new.
    assert stats.prefilled_tokens == 1 + len(tail)


def test_harness_files_and_their_errors(tmp_path):
    good = tmp_path / "pirate.yaml"
    good.write_text(
        "intro: A pirate talks with a sailor.\nuser: Sailor\nassistant: Pirate\n"
        "examples:\n  - {user: Hello, assistant: Ahoy!}\n"
    )
    harness = Harness.from_file(good)
    assert harness.render(system=None, turns=[], message="Where?") == (
        "A pirate talks with a sailor.\n\nSailor: Hello\nPirate: Ahoy!\nSailor: Where?\nPirate:"
    )
    (tmp_path / "intro.txt").write_text("Just an intro.\n")
    assert Harness.from_file(tmp_path / "intro.txt").intro == "Just an intro."
    cases = {
        "bad.yaml": ("intro: [oops\n", "bad.yaml:2: not valid YAML"),
        "keys.yaml": ("persona: x\n", "unknown harness key 'persona'"),
        "ex.json": ('{"examples": [{"user": "a"}]}', "example 1 needs 'user' and 'assistant'"),
        "name.yaml": ("user: 'A: B'\n", "speaker name must be one line without ':'"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(PocketLMError, match=message):
            Harness.from_file(tmp_path / name)
    with pytest.raises(PocketLMError, match="cannot read"):
        Harness.from_file(tmp_path / "missing.yaml")


def test_a_conversation_round_trips_through_plain_data(scripted):
    conv = fresh(scripted, harness=SHORT, system="Be nice.")
    "".join(c.text for c in conv.send("Say hello.", max_tokens=16, temperature=0))
    copy = Conversation.from_dict(conv.lm, conv.to_dict())
    assert (copy.system, copy.harness, copy.turns) == (conv.system, conv.harness, conv.turns)
    assert copy.render("x") == conv.render("x")
    with pytest.raises(PocketLMError, match="s.json: not a saved conversation"):
        Conversation.from_dict(conv.lm, {"turns": [{"user": "a"}]}, source="s.json")
