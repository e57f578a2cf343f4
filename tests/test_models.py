"""Native GPT-2 and Llama-family modules against `transformers` on the same random
weights: logits for whole sequences and through the cache, greedy ids, cache vs no-cache."""

import pytest
import torch

from checkpoints import hf_model, make_gpt2, make_llama
from pocketlm.generate.params import GenerationParams
from pocketlm.generate.sequence import Sequence
from pocketlm.generate.stream import generate_tokens
from pocketlm.models import make_cache
from pocketlm.sampling import SamplingParams
from pocketlm.weights import loader

GPT2_CONFIGS = {
    "small": dict(),
    "odd-heads": dict(n_embd=60, n_head=5, n_layer=3, n_positions=72),
    "untied": dict(tie_word_embeddings=False, n_positions=96),
    "relu-inner": dict(activation_function="relu", n_inner=100, n_layer=1),
}
LLAMA_CONFIGS = {
    "llama-gqa": dict(model_type="llama"),
    "llama-mha-tied": dict(model_type="llama", num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": dict(
        model_type="llama",
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
    "llama-linear-rope": dict(
        model_type="llama", rope_scaling=dict(rope_type="linear", factor=2.0)
    ),
    "llama-biases": dict(model_type="llama", attention_bias=True, mlp_bias=True),
    "mistral-window": dict(model_type="mistral", sliding_window=8),
    "qwen2-bias": dict(model_type="qwen2", num_key_value_heads=1),
    "qwen3-qk-norm": dict(model_type="qwen3", head_dim=24),  # more in test_qwen3.py
}


def _make(tmp_path_factory, name):
    folder = tmp_path_factory.mktemp(name)
    if name in GPT2_CONFIGS:
        return make_gpt2(folder, **GPT2_CONFIGS[name])
    return make_llama(folder, **LLAMA_CONFIGS[name])


@pytest.fixture(scope="module", params=[*GPT2_CONFIGS, *LLAMA_CONFIGS])
def pair(request, tmp_path_factory):
    folder = _make(tmp_path_factory, request.param)
    ours = loader.load(folder).model
    return ours, hf_model(folder)


def _positions(n, start=0):
    return torch.arange(start, start + n)[None]


def test_whole_sequence_logits_match_transformers(pair):
    ours, theirs = pair
    tokens = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(tokens).logits
        got = ours(tokens, _positions(40).expand(2, 40))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_prefill_then_decode_through_cache_matches(pair):
    ours, theirs = pair
    tokens = torch.randint(0, 50257, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(tokens).logits
        cache = make_cache(ours, batch_size=1, max_seq_len=64)
        prefill = ours(tokens[:, :20], _positions(20), cache)
        steps = [ours(tokens[:, i : i + 1], _positions(1, i), cache) for i in range(20, 30)]
    got = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_batched_rows_at_different_positions_match_one_by_one(pair):
    ours, _ = pair
    a = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(3))
    b = torch.randint(0, 50257, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        alone_a, alone_b = ours(a, _positions(12))[0, -1], ours(b, _positions(7))[0, -1]
        cache = make_cache(ours, batch_size=2, max_seq_len=32)
        ours(a[:, :11], _positions(11), cache)  # row 0 prefill (row 1 untouched)
        cache_b = make_cache(ours, batch_size=1, max_seq_len=32)
        ours(b[:, :6], _positions(6), cache_b)
        for whole, row in zip(cache.k + cache.v, cache_b.k + cache_b.v, strict=True):
            whole[1] = row[0]
        step = ours(torch.tensor([[a[0, 11]], [b[0, 6]]]), torch.tensor([[11], [6]]), cache)
    torch.testing.assert_close(step[0, -1], alone_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step[1, -1], alone_b, atol=1e-4, rtol=1e-4)


def test_64_greedy_tokens_identical_to_transformers_generate(pair):
    ours, theirs = pair
    prompt = [464, 3290, 318, 257]
    with torch.no_grad():
        expected = theirs.generate(
            torch.tensor([prompt]),
            max_new_tokens=64,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    greedy = GenerationParams(SamplingParams(temperature=0.0), max_tokens=64)
    steps = generate_tokens(Sequence(ours), prompt, greedy)
    assert [s.token for s in steps] == expected


def test_cache_and_no_cache_give_identical_greedy_ids(pair):
    ours, _ = pair
    ids = [464, 3290]
    with torch.no_grad():
        for _ in range(24):
            logits = ours(torch.tensor([ids]), _positions(len(ids)))
            ids.append(int(logits[0, -1].argmax()))
    greedy = GenerationParams(SamplingParams(temperature=0.0), max_tokens=24)
    steps = generate_tokens(Sequence(ours), ids[:2], greedy)
    assert [s.token for s in steps] == ids[2:]


def test_hidden_states_match_output_hidden_states(pair):
    ours, theirs = pair
    tokens = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = theirs(tokens, output_hidden_states=True).hidden_states
        got = list(ours.layer_outputs(tokens, _positions(16)))
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factor", [0.25, 0.75, 1.0])
def test_partial_rotary_rotates_the_first_dims_as_transformers(factor):
    """Partial rotary (Phi-4-mini, StableLM, GPT-NeoX): the first int(D * factor) of each
    head rotated, as transformers' Phi-3 rotary embedding and apply_rotary_pos_emb do;
    the rest passed through. D = 24 and factor 0.75: 18 rotated, not a power of two."""
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding, apply_rotary_pos_emb

    from pocketlm.models.llama import Llama, LlamaConfig
    from pocketlm.models.rope import rotate

    shape = dict(hidden_size=96, num_attention_heads=4, head_dim=24, rope_theta=1000.0)
    config = LlamaConfig(**shape, partial_rotary_factor=factor, num_hidden_layers=1,
                         vocab_size=8, intermediate_size=8)  # fmt: skip
    assert config.rotary_dim == int(24 * factor)
    theirs = Phi3RotaryEmbedding(Phi3Config(**shape, partial_rotary_factor=factor))
    positions = torch.tensor([[0, 3, 17, 250]])
    q, k = torch.randn(2, 1, 4, 4, 24).unbind(0)  # (B, H, T, D) as transformers holds them
    cos, sin = theirs(q, positions)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos, sin)
    ours_cos, ours_sin = Llama(config).rope(positions, torch.float32)  # (B, T, 1, R)
    for x, expected in ((q, expected_q), (k, expected_k)):
        got = rotate(x.transpose(1, 2), ours_cos, ours_sin, config.rotary_dim).transpose(1, 2)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[..., config.rotary_dim :], x[..., config.rotary_dim :])
