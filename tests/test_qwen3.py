"""Qwen3 (dense) natively: the Llama block with a per-head RMSNorm of q and k, against
`transformers`' own Qwen3 on the same random weights, from the HF folder and from the GGUF
llama.cpp's `convert_hf_to_gguf.py` makes of it (tests/convert.py; Qwen2's real
vocabulary, which Qwen3 shares). head_dim 24 beside hidden 64 / 4 heads, GQA, tied and
untied embeddings."""

from functools import partial

import pytest
import torch

import family_checks as check
from checkpoints import hf_model
from convert import Conversion
from pocketlm.errors import PocketLMError
from pocketlm.models import make_cache
from pocketlm.weights import card, loader
from pocketlm.weights.config import check_config, read_config
from pocketlm.weights.gguf import read_gguf

CASES = {
    "untied": dict(head_dim=24, num_key_value_heads=2, tie_word_embeddings=False),
    "tied": dict(head_dim=24, num_key_value_heads=1, tie_word_embeddings=True),
}
GGUF_CASES = {"untied-f32": ("untied", "f32"), "tied-f16": ("tied", "f16"),
              "untied-q8_0": ("untied", "q8_0")}  # fmt: skip
# What the converter writes under "qwen3." (each read; a key a newer one adds is noticed).
WRITTEN_KEYS = {"block_count", "context_length", "embedding_length", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "attention.key_length",
                "attention.value_length", "attention.layer_norm_rms_epsilon",
                "rope.freq_base"}  # fmt: skip
PROMPT = [9707, 1879, 11, 1128, 525, 498]  # "Hello world, how are you" in Qwen's ids
_tokens = partial(check.tokens, vocab=151643)  # Qwen2's vocabulary


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """Each case's HF folder (random weights, saved by transformers' Qwen3ForCausalLM)."""
    return check.make_folders(tmp_path_factory, CASES, "qwen3", rms=True)


@pytest.fixture(scope="module")
def conversions(folders) -> dict[str, Conversion]:
    """Every GGUF case's conversion started at once (they overlap)."""
    return check.start_conversions(folders, GGUF_CASES)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, folders):
    return check.load_pair(folders[request.param])


def test_the_folder_is_a_qwen3_with_q_and_k_norms(folders):
    for name, folder in folders.items():
        config = read_config(folder)
        assert config["model_type"] == "qwen3" and config["head_dim"] == 24
        assert config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]
        model = loader.load(folder).model
        names = {n for n, _ in model.named_parameters()}
        assert "model.layers.1.self_attn.q_norm.weight" in names
        assert model.model.layers[0].self_attn.k_norm.weight.shape == (24,)
        assert not model.config.attention_bias and model.config.sliding_window is None
        assert model.config.tie_word_embeddings == (name == "tied")


def test_logits_match_transformers_at_several_positions(pair):
    ours, theirs = pair
    tokens = _tokens(2, 40, seed=1)
    for start in (0, 17, 200):
        positions = check.positions(start, 40, rows=2)
        with torch.no_grad():
            expected = theirs(tokens, position_ids=positions).logits
            got = ours(tokens, positions)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_prefill_then_decode_through_cache_matches(pair):
    ours, theirs = pair
    tokens = _tokens(1, 30, seed=2)
    with torch.no_grad():
        expected = theirs(tokens).logits
        cache = make_cache(ours, batch_size=1, max_seq_len=64)
        prefill = ours(tokens[:, :20], check.positions(0, 20), cache)
        steps = [ours(tokens[:, i : i + 1], check.positions(i, 1), cache) for i in range(20, 30)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), expected, atol=1e-5, rtol=0)


def test_greedy_ids_match_transformers_generate(pair):
    ours, theirs = pair
    assert check.greedy(ours, PROMPT, 16) == check.hf_greedy(theirs, PROMPT, 16)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_prepared_fused_and_quantized(folders, quantize):
    """Fused q/k/v (the norms apply after the fused matmul): fp32 exact; int8 and int4
    within their rounding (measured: correlation with fp32 0.99992 and 0.991)."""
    folder = folders["untied"]
    reference = loader.load(folder).model
    prepared = loader.load(folder, prepare=True, quantize=quantize).model
    attn = prepared.model.layers[0].self_attn
    assert attn.qkv_proj is not None and not hasattr(attn, "q_proj")
    tokens = _tokens(1, 24, seed=3)
    with torch.no_grad():
        expected, got = (
            reference(tokens, check.positions(0, 24)),
            prepared(tokens, check.positions(0, 24)),
        )
    if quantize is None:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert check.greedy(prepared, PROMPT, 16) == check.greedy(reference, PROMPT, 16)
    else:  # rounding, not a wrong layout (q_norm and k_norm swapped: about 0.965)
        correlation = torch.corrcoef(torch.stack([got.ravel(), expected.ravel()]))[0, 1]
        assert correlation > {"int8": 0.999, "int4": 0.98}[quantize]


def test_parameter_count_matches_the_model(folders):
    for folder in folders.values():
        model = loader.load(folder).model
        assert card.count_parameters(read_config(folder)) == sum(
            p.numel() for p in model.parameters()
        )
        assert card.describe(folder).native


@pytest.mark.parametrize("name", ["untied-f32", "tied-f16"])
def test_converted_gguf_matches_transformers(name, conversions, folders):
    case, outtype = GGUF_CASES[name]
    gguf_file, folder = conversions[name].wait(), folders[case]
    ckpt = read_gguf(gguf_file)
    assert ckpt.architecture == "qwen3" and "blk.1.attn_k_norm.weight" in ckpt.tensors
    assert ("output.weight" in ckpt.tensors) == (case == "untied")
    assert {k.removeprefix("qwen3.") for k in ckpt.metadata if k.startswith("qwen3.")} == (
        WRITTEN_KEYS
    )
    from_gguf = check_config(ckpt.config, source=gguf_file)
    from_folder = check_config(read_config(folder), source=folder)
    assert from_gguf.head_dim == 24 and from_gguf.qk_norm and not from_gguf.attention_bias
    assert from_gguf.tie_word_embeddings == from_folder.tie_word_embeddings
    theirs = hf_model(folder)
    if outtype == "f16":  # the converter rounded the matrices: compare on its own weights
        theirs.load_state_dict(check.hf_names(loader.load(gguf_file, dtype=torch.float32).model))
    ours = loader.load(gguf_file, dtype=torch.float32).model
    tokens = _tokens(2, 40, seed=4)
    for start in (0, 200):
        positions = check.positions(start, 40, rows=2)
        with torch.no_grad():
            expected = theirs(tokens, position_ids=positions).logits
            got = ours(tokens, positions)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert check.greedy(ours, PROMPT, 16) == check.hf_greedy(theirs, PROMPT, 16)


@pytest.mark.parametrize(("name", "quantize"), [("tied-f16", None), ("untied-q8_0", None),
                                                 ("untied-q8_0", "int8")])  # fmt: skip
def test_converted_gguf_runs_as_stored_and_quantized(conversions, name, quantize):
    """The default load of a GGUF (its matrices kept as stored, fused and prepared) and
    Q8_0 straight into int8 agree with the same file dequantized to fp32: F16 exactly
    (measured 5e-7), Q8_0 within the int8 rounding of its activations (correlation
    0.99990 as stored, 0.99995 as int8; random weights have near ties, so no ids)."""
    gguf_file = conversions[name].wait()
    prepared = loader.load(gguf_file, prepare=True, quantize=quantize).model
    exact = loader.load(gguf_file, dtype=torch.float32).model
    tokens = _tokens(1, 24, seed=5)
    with torch.no_grad():
        got, expected = (
            prepared(tokens, check.positions(0, 24)),
            exact(tokens, check.positions(0, 24)),
        )
    if name == "tied-f16":
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert check.greedy(prepared, PROMPT, 8) == check.greedy(exact, PROMPT, 8)
    else:
        assert torch.corrcoef(torch.stack([got.ravel(), expected.ravel()]))[0, 1] > 0.999


def test_a_qwen3_sliding_window_is_refused_in_one_line(tmp_path):
    """Qwen3 windows only the layers from max_window_layers on, which pocketlm's Llama
    does not do; no released Qwen3 switches it on."""
    config = dict(model_type="qwen3", hidden_size=64, num_attention_heads=4,
                  use_sliding_window=True, sliding_window=8)  # fmt: skip
    with pytest.raises(PocketLMError, match="use_sliding_window") as error:
        check_config(config, source=tmp_path)
    assert "\n" not in str(error.value)
    off = check_config({**config, "use_sliding_window": False}, source=tmp_path)
    assert off.sliding_window is None and off.qk_norm
