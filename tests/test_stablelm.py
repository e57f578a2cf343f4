"""StableLM natively (the Llama block with LayerNorm, partial rotary, q/k/v bias, per-head
q/k LayerNorm and parallel residual switched on by its config), against `transformers`'
own StableLm on the same random weights (tests/family_checks.py), from HF folders and
from the GGUF llama.cpp's `convert_hf_to_gguf.py` makes. One key/value head for 3 query
heads rotating half, with every switch on; 4 heads on 2 rotating StableLM's default
quarter, one residual after the other. (This converter drops per-head q/k norms, so the
GGUF case has none; a file with them is refused in one line.)"""

import numpy as np
import pytest

import family_checks as check
from checkpoints import write_gguf
from convert import Conversion
from pocketlm.errors import PocketLMError
from pocketlm.weights import loader
from pocketlm.weights.gguf import read_gguf

CASES = {
    "qk-norms": dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1,
                     intermediate_size=160, partial_rotary_factor=0.5, use_qkv_bias=True,
                     qk_layernorm=True, use_parallel_residual=True),
    "sequential": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=96),
}  # fmt: skip
GGUF_CASES = {"sequential-f32": ("sequential", "f32"), "sequential-q8_0": ("sequential", "q8_0")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    return check.make_folders(tmp_path_factory, CASES, "stablelm")


@pytest.fixture(scope="module")
def conversions(folders) -> dict[str, Conversion]:
    return check.start_conversions(folders, GGUF_CASES)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, folders):
    return check.load_pair(folders[request.param])


def test_the_cases_switch_on_what_they_say(folders):
    qk, sequential = (loader.load(folders[n]).model for n in CASES)
    attn = qk.model.layers[0].self_attn
    assert qk.config.rotary_dim == 16 and qk.config.layer_norm and qk.config.norm_eps == 1e-5
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    assert len(attn.q_layernorm.norms) == 3 and len(attn.k_layernorm.norms) == 1
    assert qk.model.layers[0].post_attention_layernorm is None  # parallel residual
    assert sequential.config.rotary_dim == 4  # a quarter of 16 unless the config says
    assert sequential.model.layers[0].post_attention_layernorm is not None


def test_logits_match_transformers_at_several_positions(pair):
    check.assert_logits_match(*pair)


def test_prefill_then_decode_through_cache_matches(pair):
    check.assert_cache_matches(*pair)


def test_greedy_ids_match_transformers_generate(pair):
    ours, theirs = pair
    assert check.greedy(ours, check.PROMPT, 16) == check.hf_greedy(theirs, check.PROMPT, 16)


def test_batched_serving_equals_each_request_alone(folders):
    check.assert_batched_equals_alone(folders["qk-norms"])


def test_int8_parameter_count_and_card(folders):
    check.assert_int8_close(folders["qk-norms"])
    for folder in folders.values():
        check.assert_counted_and_native(folder)


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_converted_gguf_matches_transformers(name, conversions, folders):
    case, outtype = GGUF_CASES[name]
    gguf_file = conversions[name].wait()
    ckpt = read_gguf(gguf_file)
    assert ckpt.architecture == "stablelm" and ckpt.metadata["stablelm.rope.dimension_count"] == 4
    assert ckpt.metadata["stablelm.use_parallel_residual"] is False
    check.assert_gguf_matches(gguf_file, folders[case], rounded=outtype != "f32")
    check.assert_stored_matches(gguf_file)


def test_a_gguf_with_per_head_qk_norms_is_refused_in_one_line(conversions, tmp_path):
    """The f32 file with an attn_q_norm added (as older converters wrote them)."""
    ckpt = read_gguf(conversions["sequential-f32"].wait())
    kv = {k: v for k, v in ckpt.metadata.items() if k.startswith("stablelm.")}
    tensors = {"token_embd.weight": (np.zeros((8, 64), np.float32), "F32"),
               "blk.0.attn_q_norm.weight": (np.ones((4, 16), np.float32), "F32")}  # fmt: skip
    path = write_gguf(tmp_path / "qk.gguf", "stablelm", kv=kv, tensors=tensors)
    with pytest.raises(PocketLMError, match="attn_q_norm") as error:
        read_gguf(path)
    assert "\n" not in str(error.value)
