"""GGUF files made by llama.cpp's own converter (tests/convert.py) against `transformers` on
the HF folder they were made from: logits, greedy ids, the config pocketlm reads, and
every metadata key and tensor the converter wrote (so that a key a newer converter adds
is noticed, read or refused, rather than silently ignored).

Cases: Llama 3.1 (llama3 rope scaling, which the converter turns into `rope_freqs.weight`;
head_dim 64 beside hidden 64, so `attention.key_length` matters), Llama 3.2 (the same,
tied embeddings), Mistral (NeMo-style head_dim; the converter drops its sliding window,
as llama.cpp runs it), Qwen2 (q/k/v bias, tied, Qwen2's real vocabulary) and GPT-2.
"""

from dataclasses import fields

import pytest
import torch

from checkpoints import hf_model
from convert import Conversion, make_convertible
from pocketlm.generate.params import GenerationParams
from pocketlm.generate.sequence import Sequence
from pocketlm.generate.stream import generate_tokens
from pocketlm.models.rope import rope_inv_freq
from pocketlm.sampling import SamplingParams
from pocketlm.weights import loader
from pocketlm.weights.config import check_config, read_config
from pocketlm.weights.gguf import read_gguf


def llama3(factor: float) -> dict:
    # Llama 3.1's numbers but the original context (8192 there): at these head sizes a
    # few pairs fall in the blended band between kept and divided frequencies.
    return dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=1024)  # fmt: skip


CASES = {
    "llama3.1": dict(model_type="llama", head_dim=64, rope_theta=500000.0,
                     rope_scaling=llama3(8.0), max_position_embeddings=8192),
    "llama3.2-tied": dict(model_type="llama", tie_word_embeddings=True, rope_theta=500000.0,
                          rope_scaling=llama3(32.0), max_position_embeddings=8192,
                          attention_bias=True, mlp_bias=True),  # o_proj and MLP biases too
    "mistral": dict(model_type="mistral", head_dim=32),
    "qwen2-tied": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1000000.0),
    "gpt2": dict(model_type="gpt2", n_ctx=128),  # transformers 5 no longer writes n_ctx
}  # fmt: skip
LLAMA3 = ("llama3.1", "llama3.2-tied")

# What the converter writes under "{architecture}." (beyond general.* and tokenizer.*).
QWEN2_KEYS = {"block_count", "context_length", "embedding_length", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv", "rope.freq_base",
              "attention.layer_norm_rms_epsilon"}  # fmt: skip
WRITTEN_KEYS = {
    # config.json's head_dim (transformers 5 writes it for Llama and Mistral, not Qwen2)
    "llama": QWEN2_KEYS | {"attention.key_length", "attention.value_length",
                           "rope.dimension_count", "vocab_size"},
    "qwen2": QWEN2_KEYS,
    "gpt2": {"block_count", "context_length", "embedding_length", "feed_forward_length",
             "attention.head_count", "attention.layer_norm_epsilon"},
}  # fmt: skip
GENERAL_KEYS = {"general.architecture", "general.type", "general.name", "general.size_label",
                "general.file_type", "general.quantization_version"}  # fmt: skip


@pytest.fixture(scope="module")
def conversions(tmp_path_factory) -> dict[str, Conversion]:
    """Every case's HF folder, its conversion started at once (they overlap)."""
    jobs = {}
    for name, config in CASES.items():
        folder = make_convertible(tmp_path_factory.mktemp(name), **config)
        jobs[name] = Conversion(folder, folder.parent / f"{name}.gguf")
    return jobs


@pytest.fixture(scope="module", params=list(CASES))
def case(request, conversions):
    """(name, HF folder, the converter's GGUF of it), made once per module."""
    job = conversions[request.param]
    return request.param, job.folder, job.wait()


@pytest.fixture(scope="module")
def pair(case):
    _, folder, gguf_file = case
    return loader.load(gguf_file).model, hf_model(folder)


def _positions(start: int, n: int, rows: int = 1) -> torch.Tensor:
    return torch.arange(start, start + n)[None].expand(rows, n)


def test_logits_match_transformers_on_the_folder(case, pair):
    name, _, _ = case
    ours, theirs = pair
    tokens = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))
    # Far positions too, where the rotary scaling matters (GPT-2's are learned, 128).
    for start in (0,) if name == "gpt2" else (0, 3000):
        positions = _positions(start, 40, rows=2)
        with torch.no_grad():
            expected = theirs(tokens, position_ids=positions).logits
            got = ours(tokens, positions)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_greedy_ids_match_transformers_generate(pair):
    ours, theirs = pair
    prompt = [464, 3290, 318, 257]
    with torch.no_grad():
        expected = theirs.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()  # fmt: skip
    greedy = GenerationParams(SamplingParams(temperature=0.0), max_tokens=24)
    assert [s.token for s in generate_tokens(Sequence(ours), prompt, greedy)] == expected


def test_config_equals_the_folders(case):
    """Every field pocketlm's config reads, from the GGUF and from config.json."""
    name, folder, gguf_file = case
    from_gguf = check_config(read_gguf(gguf_file).config, source=gguf_file)
    from_folder = check_config(read_config(folder), source=folder)
    # Read differently, compared below: the rotary frequencies (llama3's numbers become
    # per-pair factors), epsilons (stored as float32), Mistral's architecture ("llama" in
    # a GGUF) and sliding windows (the converter writes none; llama.cpp runs without;
    # Qwen2's use_sliding_window only switches its window off).
    apart = {"rope_scaling", "rope_parameters", "rms_norm_eps", "layer_norm_epsilon",
             "model_type", "sliding_window", "use_sliding_window", "layer_windows",
             "norm_eps"}  # fmt: skip
    for f in fields(from_folder):
        if f.name not in apart:
            assert getattr(from_gguf, f.name) == getattr(from_folder, f.name), f.name
    if name == "gpt2":
        assert from_gguf.layer_norm_epsilon == pytest.approx(from_folder.layer_norm_epsilon)
        return
    assert from_gguf.rms_norm_eps == pytest.approx(from_folder.rms_norm_eps)
    assert from_gguf.norm_eps == pytest.approx(from_folder.norm_eps)
    # Equal but for float32 rounding: the converter computes the factors from float32
    # frequencies (measured: one pair of 32 one ulp apart, 1.2e-7 relative).
    torch.testing.assert_close(
        rope_inv_freq(from_gguf), rope_inv_freq(from_folder), rtol=2**-22, atol=0
    )
    assert from_gguf.sliding_window is None
    assert from_folder.sliding_window == (4096 if name == "mistral" else None)


def test_what_the_converter_wrote(case):
    """The metadata and tensors, key by key: each is one pocketlm reads or knowingly
    leaves (general.*: names; tokenizer.*: the tokenizer's)."""
    name, _, gguf_file = case
    ckpt = read_gguf(gguf_file)
    arch = ckpt.architecture
    assert arch == {"mistral": "llama", "qwen2-tied": "qwen2", "gpt2": "gpt2"}.get(name, "llama")
    model_keys = {k.removeprefix(f"{arch}.") for k in ckpt.metadata if k.startswith(f"{arch}.")}
    assert model_keys == WRITTEN_KEYS[arch]  # no rope.scaling.*: llama3 is a tensor
    others = {k for k in ckpt.metadata if not k.startswith((f"{arch}.", "tokenizer."))}
    assert others == GENERAL_KEYS
    assert ckpt.quantization == "F32" and ckpt.config["torch_dtype"] == "float32"
    assert ("rope_freqs.weight" in ckpt.tensors) == (name in LLAMA3)
    assert ("output.weight" in ckpt.tensors) == (name in ("llama3.1", "mistral"))
    assert ("blk.0.attn_q.bias" in ckpt.tensors) == (name in ("qwen2-tied", "llama3.2-tied"))
    assert ("blk.0.ffn_up.bias" in ckpt.tensors) == (name in ("llama3.2-tied", "gpt2"))
    if name in LLAMA3:  # kept, divided by `factor`, and some blended between
        factors, top = ckpt.config["rope_scaling"]["factors"], CASES[name]["rope_scaling"]["factor"]
        assert ckpt.config["rope_scaling"]["rope_type"] == "freq_factors"
        assert len(factors) == ckpt.config["head_dim"] // 2
        assert factors[0] == 1.0 and factors[-1] == top and any(1 < f < top for f in factors)
