"""Falcon natively (models/neox.py), against `transformers`' own Falcon on the same random
weights (tests/family_checks.py), from HF folders and from the GGUF llama.cpp's
`convert_hf_to_gguf.py` makes (its fused attn_qkv regrouped back per key/value head).
The new decoder architecture (6 heads sharing 2 key/value heads, ln_attn and ln_mlp);
falcon-7b's (multi-query: 3 heads, one key/value head; one LayerNorm, parallel; biases);
the old one without multi-query or parallel attention; the old one with a key/value head
per head and one LayerNorm (falcon-rw's shape, rotary). The converter cannot regroup a
biased attn_qkv nor, under transformers 5, convert a multi-query one (it is told one
key/value head per head), so the GGUF cases are the new architecture's and the last."""

import pytest

import family_checks as check
from convert import Conversion
from pocketlm.errors import PocketLMError
from pocketlm.weights import loader
from pocketlm.weights.config import check_config
from pocketlm.weights.gguf import read_gguf

CASES = {
    "new": dict(hidden_size=96, num_attention_heads=6, num_kv_heads=2,
                new_decoder_architecture=True),
    "7b": dict(hidden_size=96, num_attention_heads=3, multi_query=True, parallel_attn=True,
               bias=True),
    "sequential": dict(hidden_size=64, num_attention_heads=4, multi_query=False,
                       parallel_attn=False, tie_word_embeddings=False, ffn_hidden_size=96),
    "one-norm": dict(hidden_size=64, num_attention_heads=4, multi_query=False),
}  # fmt: skip
GGUF_CASES = {"new-f32": ("new", "f32"), "new-q8_0": ("new", "q8_0"),
              "one-norm-f16": ("one-norm", "f16")}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    return check.make_folders(tmp_path_factory, CASES, "falcon")


@pytest.fixture(scope="module")
def conversions(folders) -> dict[str, Conversion]:
    return check.start_conversions(folders, GGUF_CASES)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, folders):
    return check.load_pair(folders[request.param])


def test_the_cases_switch_on_what_they_say(folders):
    new, old, sequential, _ = (loader.load(folders[n]).model for n in CASES)
    assert (new.config.num_kv_heads, new.config.two_norms, new.config.parallel) == (2, True, True)
    assert hasattr(new.transformer.h[0], "ln_mlp")
    assert (old.config.num_kv_heads, old.config.two_norms, old.config.parallel) == (1, False, True)
    assert old.config.qkv_bias and old.transformer.h[0].mlp.dense_h_to_4h.bias is not None
    assert (sequential.config.num_kv_heads, sequential.config.parallel) == (4, False)


def test_logits_match_transformers_at_several_positions(pair):
    check.assert_logits_match(*pair)


def test_prefill_then_decode_through_cache_matches(pair):
    check.assert_cache_matches(*pair)


def test_greedy_ids_match_transformers_generate(pair):
    ours, theirs = pair
    assert check.greedy(ours, check.PROMPT, 16) == check.hf_greedy(theirs, check.PROMPT, 16)


def test_batched_serving_equals_each_request_alone(folders):
    check.assert_batched_equals_alone(folders["new"])


def test_int8_parameter_count_and_card(folders):
    check.assert_int8_close(folders["new"])
    for folder in folders.values():
        check.assert_counted_and_native(folder)


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_converted_gguf_matches_transformers(name, conversions, folders):
    case, outtype = GGUF_CASES[name]
    gguf_file = conversions[name].wait()
    ckpt = read_gguf(gguf_file)
    kv_heads = ckpt.metadata["falcon.attention.head_count_kv"]
    assert ckpt.architecture == "falcon" and kv_heads == {"new": 2, "one-norm": 4}[case]
    assert ("blk.1.attn_norm_2.weight" in ckpt.tensors) == (case == "new")
    check.assert_gguf_matches(gguf_file, folders[case], rounded=outtype != "f32")
    check.assert_stored_matches(gguf_file)


def test_alibi_falcon_is_refused_in_one_line(tmp_path):
    config = dict(model_type="falcon", hidden_size=64, num_attention_heads=4, alibi=True)
    with pytest.raises(PocketLMError, match="ALiBi") as error:
        check_config(config, source=tmp_path)
    assert "\n" not in str(error.value)
