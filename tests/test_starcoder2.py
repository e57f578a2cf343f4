"""Starcoder2 natively (the Llama block with LayerNorm, biases on every projection and a
plain GELU MLP, c_fc/c_proj, switched on by its config), against `transformers`' own
Starcoder2 on the same random weights (tests/family_checks.py), from HF folders and from
the GGUF llama.cpp's `convert_hf_to_gguf.py` makes. 6 heads on 2 key/value heads with a
sliding window of 8 (the prompts reach past it), tied head; 3 heads on one, no biases,
untied. The converter writes no sliding window, and llama.cpp runs the file without one:
so does pocketlm, and so is transformers run for that comparison."""

import pytest

import family_checks as check
from convert import Conversion
from pocketlm.weights import loader
from pocketlm.weights.gguf import read_gguf

CASES = {
    "window": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                   intermediate_size=160, sliding_window=8),
    "plain": dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1,
                  intermediate_size=128, use_bias=False, tie_word_embeddings=False),
}  # fmt: skip
GGUF_CASES = {"window-f32": ("window", "f32"), "window-q8_0": ("window", "q8_0")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    return check.make_folders(tmp_path_factory, CASES, "starcoder2")


@pytest.fixture(scope="module")
def conversions(folders) -> dict[str, Conversion]:
    return check.start_conversions(folders, GGUF_CASES)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, folders):
    return check.load_pair(folders[request.param])


def test_the_cases_switch_on_what_they_say(folders):
    window, plain = (loader.load(folders[n]).model for n in CASES)
    layer = window.model.layers[0]
    assert window.config.sliding_window == 8 and window.config.tie_word_embeddings
    assert layer.self_attn.o_proj.bias is not None and layer.mlp.c_fc.bias is not None
    assert layer.input_layernorm.bias is not None and not hasattr(layer.mlp, "gate_proj")
    assert plain.model.layers[0].mlp.c_proj.bias is None and not plain.config.tie_word_embeddings


def test_logits_match_transformers_at_several_positions(pair):
    check.assert_logits_match(*pair)


def test_prefill_then_decode_through_cache_matches(pair):
    check.assert_cache_matches(*pair)


def test_greedy_ids_match_transformers_generate(pair):
    ours, theirs = pair
    assert check.greedy(ours, check.PROMPT, 16) == check.hf_greedy(theirs, check.PROMPT, 16)


def test_batched_serving_equals_each_request_alone(folders):
    check.assert_batched_equals_alone(folders["window"])


def test_int8_parameter_count_and_card(folders):
    check.assert_int8_close(folders["window"])
    for folder in folders.values():
        check.assert_counted_and_native(folder)


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_converted_gguf_matches_transformers(name, conversions, folders):
    case, outtype = GGUF_CASES[name]
    gguf_file = conversions[name].wait()
    ckpt = read_gguf(gguf_file)
    assert ckpt.architecture == "starcoder2" and "blk.1.ffn_up.bias" in ckpt.tensors
    assert ckpt.config["sliding_window"] is None  # not written by the converter
    check.assert_gguf_matches(gguf_file, folders[case], rounded=outtype != "f32", window_kept=False)
    check.assert_stored_matches(gguf_file)
