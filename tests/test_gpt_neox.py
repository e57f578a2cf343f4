"""GPT-NeoX / Pythia natively (models/neox.py), against `transformers`' own GPTNeoX on the
same random weights (tests/family_checks.py), from the HF folder and from the GGUF
llama.cpp's `convert_hf_to_gguf.py` makes of it (its fused attn_qkv regrouped back).
Three heads of 32 (an odd count) rotating a quarter, parallel residual; four heads
rotating half, one residual after the other, no attention bias, tied head."""

import pytest

import family_checks as check
from convert import Conversion
from pocketlm.weights import loader
from pocketlm.weights.gguf import read_gguf

CASES = {
    "parallel": dict(hidden_size=96, num_attention_heads=3, intermediate_size=160,
                     rotary_pct=0.25),
    "sequential": dict(hidden_size=64, num_attention_heads=4, intermediate_size=96,
                       rotary_pct=0.5, use_parallel_residual=False, attention_bias=False,
                       tie_word_embeddings=True),
}  # fmt: skip
GGUF_CASES = {"parallel-f32": ("parallel", "f32"), "parallel-q8_0": ("parallel", "q8_0"),
              "sequential-f16": ("sequential", "f16")}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    return check.make_folders(tmp_path_factory, CASES, "gpt_neox", prefix="neox")


@pytest.fixture(scope="module")
def conversions(folders) -> dict[str, Conversion]:
    return check.start_conversions(folders, GGUF_CASES)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, folders):
    return check.load_pair(folders[request.param])


def test_the_cases_switch_on_what_they_say(folders):
    parallel, sequential = (loader.load(folders[n]).model.config for n in CASES)
    assert (parallel.head_dim, parallel.rotary_dim, parallel.parallel) == (32, 8, True)
    assert (sequential.head_dim, sequential.rotary_dim, sequential.parallel) == (16, 8, False)
    assert not sequential.qkv_bias and sequential.tie_word_embeddings


def test_logits_match_transformers_at_several_positions(pair):
    check.assert_logits_match(*pair)


def test_prefill_then_decode_through_cache_matches(pair):
    check.assert_cache_matches(*pair)


def test_greedy_ids_match_transformers_generate(pair):
    ours, theirs = pair
    assert check.greedy(ours, check.PROMPT, 16) == check.hf_greedy(theirs, check.PROMPT, 16)


def test_batched_serving_equals_each_request_alone(folders):
    check.assert_batched_equals_alone(folders["parallel"])


def test_int8_parameter_count_and_card(folders):
    check.assert_int8_close(folders["parallel"])
    for folder in folders.values():
        check.assert_counted_and_native(folder)


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_converted_gguf_matches_transformers(name, conversions, folders):
    case, outtype = GGUF_CASES[name]
    gguf_file = conversions[name].wait()
    ckpt = read_gguf(gguf_file)
    assert ckpt.architecture == "gptneox" and ckpt.config["model_type"] == "gpt_neox"
    assert ckpt.metadata["gptneox.use_parallel_residual"] == (case == "parallel")
    check.assert_gguf_matches(gguf_file, folders[case], rounded=outtype != "f32")
    check.assert_stored_matches(gguf_file)
