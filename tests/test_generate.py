"""Generation through the Python API on tiny random GPT-2 checkpoints: stop sequences
across token boundaries, streaming of multi-token characters, seeds, the sliding window
past the context, prompt truncation, and the formats a checkpoint may come in."""

import json
import logging
import pickle

import pytest
import torch
from safetensors.torch import load_file

import pocketlm
from checkpoints import hf_model, make_gpt2
from pocketlm.errors import PocketLMError
from pocketlm.generate.request import Step, TextStream
from pocketlm.generate.stream import stream_text
from pocketlm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_gpt2(tmp_path_factory.mktemp("tiny"), n_positions=256)


@pytest.fixture(scope="module")
def lm(tiny):
    return pocketlm.load(str(tiny))


def test_generate_returns_text_finish_reason_and_usage(lm):
    out = lm.generate("Alice was beginning to", max_tokens=12, temperature=0)
    assert out.finish_reason == "length"
    assert out.usage.prompt_tokens == len(lm.tokenizer.encode("Alice was beginning to"))
    assert out.usage.completion_tokens == 12 == len(out.tokens)
    assert out.text == lm.tokenizer.decode(out.tokens)


def test_stream_pieces_join_to_generate_text(lm):
    pieces = list(lm.stream("Hello there", max_tokens=20, temperature=0))
    assert pieces[-1].finish_reason == "length"
    assert (
        "".join(p.text for p in pieces)
        == lm.generate("Hello there", max_tokens=20, temperature=0).text
    )


def test_stop_sequence_spanning_token_boundaries(lm):
    full = lm.generate("The dog", max_tokens=40, temperature=0)
    # A stop string made of the end of one token and the start of the next.
    pieces = [lm.tokenizer.decode([t]) for t in full.tokens]
    split = next(i for i in range(3, len(pieces)) if len(pieces[i - 1]) > 1 and len(pieces[i]) > 1)
    stop = pieces[split - 1][-2:] + pieces[split][:2]
    cut = full.text.index(stop)
    out = lm.generate("The dog", max_tokens=40, temperature=0, stop=[stop, "never-seen-string"])
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    streamed = "".join(
        c.text for c in lm.stream("The dog", max_tokens=40, temperature=0, stop=stop)
    )
    assert streamed == full.text[:cut]


def test_streaming_never_splits_a_multibyte_character():
    tok = Tokenizer.gpt2()
    text = "Café 🎉🇫🇷 世界 naïve — ok"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # characters really span several byte-level tokens
    chunks = list(stream_text((Step(i) for i in ids), TextStream(tok), max_tokens=len(ids)))
    assert "".join(c.text for c in chunks) == text
    assert all("\ufffd" not in c.text for c in chunks)


def test_seed_makes_sampling_reproducible(lm):
    a = lm.generate("Once upon a time", max_tokens=24, temperature=1.0, seed=7)
    b = lm.generate("Once upon a time", max_tokens=24, temperature=1.0, seed=7)
    c = lm.generate("Once upon a time", max_tokens=24, temperature=1.0, seed=8)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_end_of_text_stops_generation(lm):
    eos = 50256
    out = lm.generate("Hi", max_tokens=10, temperature=0, logit_bias={eos: 100})
    assert out.finish_reason == "stop"
    # The end-of-text token is counted as generated but never shown.
    assert out.tokens == [] and out.text == "" and out.usage.completion_tokens == 1


def test_generation_slides_past_the_context_window(tmp_path):
    folder = make_gpt2(tmp_path / "short", n_positions=32)
    lm = pocketlm.load(str(folder))
    prompt = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    session = lm.session()
    out = session.generate(prompt, max_tokens=60, temperature=0)
    assert len(out.tokens) == 60 and session.sequence.rebuilds >= 2
    # Oracle: transformers, no cache, on the window our policy keeps at each step.
    theirs, keep = hf_model(folder), int(32 * 0.75)
    ids, start = list(prompt), 0
    with torch.no_grad():
        for _ in range(60):
            if len(ids) - start > 32:
                start = len(ids) - keep
            ids.append(int(theirs(torch.tensor([ids[start:]])).logits[0, -1].argmax()))
    assert out.tokens == ids[len(prompt) :]


def test_long_prompt_is_truncated_from_the_left_with_a_warning(tmp_path, caplog):
    lm = pocketlm.load(str(make_gpt2(tmp_path / "short", n_positions=32)))
    prompt = list(range(100, 150))
    with caplog.at_level(logging.WARNING, logger="pocketlm"):
        out = lm.generate(prompt, max_tokens=3, temperature=0)
    assert "keeping the last 31" in caplog.text
    assert out.usage.prompt_tokens == 31
    assert out.tokens == lm.generate(prompt[-31:], max_tokens=3, temperature=0).tokens
    with pytest.raises(PocketLMError, match="context window is 32"):
        lm.generate(prompt, max_tokens=3, truncate=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(max_tokens=0), "max_tokens must be at least 1"),
        (dict(temperature=-1), "temperature must be >= 0"),
        (dict(top_p=0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(top_k=-2), "top_k"),
        (dict(logit_bias={60000: 1.0}), "out of range"),
        (dict(nucleus=0.9), "unknown option 'nucleus'"),
        (dict(tempurature=0.9), "unknown option 'tempurature'; did you mean 'temperature'"),
        (dict(stop=["ok", ""]), "stop sequences must be non-empty"),
        (dict(logprobs=-1), "logprobs must be between 0"),
    ],
)
def test_bad_options_are_one_line_errors(lm, options, message):
    with pytest.raises(PocketLMError, match=message) as error:
        lm.generate("Hi", **{"max_tokens": 4, **options})
    assert "\n" not in str(error.value)


def test_empty_prompt_is_refused(lm):
    with pytest.raises(PocketLMError, match="empty"):
        lm.generate("", max_tokens=4)


def test_sharded_safetensors_and_weights_only_bin_load_the_same_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    reference = pocketlm.load(str(tiny)).generate("Sharded", max_tokens=8, temperature=0).tokens
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(sharded, max_shard_size="1MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    (sharded / "vocab.json").write_bytes((tiny / "vocab.json").read_bytes())
    (sharded / "merges.txt").write_bytes((tiny / "merges.txt").read_bytes())
    assert (
        pocketlm.load(str(sharded)).generate("Sharded", max_tokens=8, temperature=0).tokens
        == reference
    )

    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_bytes((tiny / "config.json").read_bytes())
    torch.save(load_file(tiny / "model.safetensors"), binary / "pytorch_model.bin")
    assert (
        pocketlm.load(str(binary)).generate("Sharded", max_tokens=8, temperature=0).tokens
        == reference
    )


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_in_a_bin_checkpoint_is_refused(tiny, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny / "config.json").read_bytes())
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": _Evil()}, f)
    with pytest.raises(PocketLMError, match="cannot be loaded safely"):
        pocketlm.load(str(folder))


def test_checkpoint_errors_name_the_tensor(tiny, tmp_path):
    from safetensors.torch import save_file

    tensors = load_file(tiny / "model.safetensors")
    config = json.loads((tiny / "config.json").read_text())

    def folder_with(name, state):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        save_file(state, folder / "model.safetensors")
        return str(folder)

    missing = {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(PocketLMError, match=r"missing tensor 'transformer\.h\.1\.mlp\.c_fc\.bias'"):
        pocketlm.load(folder_with("missing", missing))
    wrong = {**tensors, "transformer.h.0.attn.c_proj.weight": torch.zeros(64, 63)}
    with pytest.raises(
        PocketLMError, match=r"'transformer\.h\.0\.attn\.c_proj\.weight' has shape \(63, 64\)"
    ):
        pocketlm.load(folder_with("shape", wrong))
    extra = {**tensors, "transformer.h.0.attn.rogue": torch.zeros(3)}
    with pytest.raises(PocketLMError, match="unexpected tensor 'transformer.h.0.attn.rogue'"):
        pocketlm.load(folder_with("extra", extra))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(json.dumps(config))
    (corrupt / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(PocketLMError, match="not a readable safetensors file"):
        pocketlm.load(str(corrupt))


@pytest.mark.golden
def test_real_gpt2_greedy_golden_ids():
    """Opt-in (POCKETLM_GOLDEN=1): needs the real gpt2 weights in the HF cache."""
    lm = pocketlm.load("gpt2", offline=True)
    out = lm.generate("The dog", max_tokens=18, temperature=0)
    assert lm.tokenizer.encode("The dog") + out.tokens == [
        464,
        3290,
        373,
        1043,
        287,
        257,
        2214,
        1474,
        262,
        16246,
        286,
        2688,
        290,
        2688,
        27262,
        13,
        198,
        198,
        464,
        3290,
    ]
