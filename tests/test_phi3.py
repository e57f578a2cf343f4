"""Phi-3 / Phi-3.5 / Phi-4-mini (model_type phi3) natively, and YaRN (Qwen2.5's long
context): the Llama block with q/k/v and gate/up each stored as one matrix, LongRoPE
(short or long factors by the sequence's length, an attention factor), partial rotary,
a sliding window; against `transformers`' own Phi3 and Qwen2 on the same random weights,
from the HF folder and from the GGUF llama.cpp's `convert_hf_to_gguf.py` makes of it
(tests/convert.py: the Phi-3 case with Mistral's SentencePiece tokenizer.model, as Phi-3's
own is one; the Phi-4-mini-like case with a GPT-2 BPE, as Phi-4-mini's is).

The switches at sizes a short prompt reaches: LongRoPE's original context 32 (a 40-token
prompt runs on the long factors, and 16 greedy tokens after a 24-token prompt cross it),
a sliding window of 16, YaRN's original context 32 with factor 4."""

import json

import pytest
import torch

import family_checks as check
import pocketlm
from checkpoints import hf_model
from convert import Conversion, make_convertible
from pocketlm.errors import PocketLMError
from pocketlm.generate.sequence import Sequence
from pocketlm.models import make_cache
from pocketlm.sampling import SamplingParams
from pocketlm.serve.scheduler import Scheduler
from pocketlm.train.export import hf_state_dict
from pocketlm.weights import loader
from pocketlm.weights.adapter import target_linears
from pocketlm.weights.config import check_config
from pocketlm.weights.gguf import read_gguf
from test_serve_scheduler import Run

SWITCH = 32  # LongRoPE's and YaRN's original_max_position_embeddings


def _longrope(pairs: int) -> dict:
    """Distinct short and long factors, one per rotated pair (Phi-3's are ~1-1.2 short,
    ~1-50 long)."""
    return dict(
        rope_type="longrope",
        rope_theta=10000.0,
        short_factor=[1.0 + 0.05 * i for i in range(pairs)],
        long_factor=[1.0 + 0.7 * i for i in range(pairs)],
    )


CASES = {
    # Phi-3-mini-128k-like: LongRoPE, a sliding window; SentencePiece for the converter.
    "phi3": dict(model_type="phi3", spm=True, original_max_position_embeddings=SWITCH,
                 sliding_window=16, pad_token_id=0, rope_parameters=_longrope(8)),
    # Phi-4-mini-like: head_dim 24 with 18 of it rotated, GQA 4:1, tied, LongRoPE, no window.
    "phi4mini": dict(model_type="phi3", hidden_size=96, num_attention_heads=4,
                     num_key_value_heads=1, tie_word_embeddings=True, sliding_window=None,
                     pad_token_id=0, original_max_position_embeddings=SWITCH,
                     rope_parameters={**_longrope(9), "partial_rotary_factor": 0.75}),
    # Qwen2.5 with YaRN switched on (its README's rope_scaling, at a small context).
    "qwen2yarn": dict(model_type="qwen2"),
}  # fmt: skip
# Three conversions (they run at once, and dominate this file's time): the Q8_0 one is
# checked against transformers on its own dequantized weights, as the F16 one.
GGUF_CASES = {"phi3-q8_0": ("phi3", "q8_0"), "phi4mini-f16": ("phi4mini", "f16"),
              "qwen2yarn-f32": ("qwen2yarn", "f32")}  # fmt: skip
PROMPT = [464, 3290, 373, 1043, 287, 257, 2214, 1474, 262, 16246, 286, 2688,
          290, 2688, 27262, 13, 198, 198, 464, 3290, 11, 1128, 525, 498]  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    made = {}
    for name, config in CASES.items():
        folder = made[name] = tmp_path_factory.mktemp(name)
        if name == "qwen2yarn":
            make_convertible(folder, model_type="qwen2", rope_parameters=dict(
                rope_type="yarn", factor=4.0, original_max_position_embeddings=SWITCH))  # fmt: skip
            _readme_rope_scaling(folder)
        else:
            make_convertible(folder, **config)
        check.randomize_norms(folder, rms=True)
    return made


def _readme_rope_scaling(folder) -> None:
    """config.json's YaRN as Qwen2.5's README tells users to write it (rope_scaling with
    "type", rope_theta beside it), which transformers 5 still reads."""
    file = folder / "config.json"
    config = json.loads(file.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = {"type": "yarn", "factor": 4.0,
                              "original_max_position_embeddings": SWITCH}  # fmt: skip
    file.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def conversions(folders) -> dict[str, Conversion]:
    return check.start_conversions(folders, GGUF_CASES)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, folders):
    return check.load_pair(folders[request.param])


def test_the_folders_are_what_they_claim(folders, conversions):
    # `conversions`: started here, so that they run while the tests below do.
    phi3 = loader.load(folders["phi3"]).model
    names = {n for n, _ in phi3.named_parameters()}
    assert "model.layers.1.self_attn.qkv_proj.weight" in names  # HF's own names, as stored
    assert "model.layers.1.mlp.gate_up_proj.weight" in names
    assert not any(".q_proj." in n or ".gate_proj." in n for n in names)
    assert phi3.config.rope_switch_length == SWITCH and phi3.config.sliding_window == 16
    assert phi3.long_inv_freq is not None and phi3.attention_factor > 1.0
    mini = loader.load(folders["phi4mini"]).model
    assert mini.config.rotary_dim == 18 and mini.config.head_dim == 24
    assert mini.long_inv_freq.shape == (9,) and mini.config.tie_word_embeddings
    qwen = loader.load(folders["qwen2yarn"]).model
    assert qwen.config.rope_scaling["rope_type"] == "yarn" and qwen.long_inv_freq is None
    assert qwen.attention_factor == pytest.approx(1 + 0.1 * torch.log(torch.tensor(4.0)).item())


def test_logits_match_transformers_short_and_long(pair):
    """A 20-token call from position 0 stays on LongRoPE's short factors, a 40-token one
    (or any that starts later) runs on the long ones, in both engines; YaRN is one set."""
    ours, theirs = pair
    for start, n in ((0, 20), (0, 40), (17, 40), (200, 40)):
        tokens = check.tokens(2, n, seed=start + n)
        positions = check.positions(start, n, rows=2)
        with torch.no_grad():
            expected = theirs(tokens, position_ids=positions).logits
            got = ours(tokens, positions)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_the_factors_really_switch(folders):
    """The same 20 tokens at the same positions give other logits once the call reaches
    past the switch: the long factors are in use (and transformers agrees above)."""
    ours = loader.load(folders["phi3"]).model
    tokens = check.tokens(1, 40, seed=3)
    with torch.no_grad():
        short = ours(tokens[:, :20], check.positions(0, 20))
        long = ours(tokens, check.positions(0, 40))[:, :20]
    assert (short - long).abs().max() > 1e-3  # random weights: small, but far from 0


def test_cached_generation_equals_uncached_across_the_switch(pair):
    """A Sequence prefilled short, then stepped past the switch, recomputes its cache with
    the long factors there (as transformers' generate does): every step's logits equal
    those of the whole sequence computed at once."""
    ours, _ = pair
    tokens = check.tokens(1, 40, seed=4)[0].tolist()
    sequence = Sequence(ours)
    with torch.no_grad():
        got = [sequence.prefill(tokens[:20])] + [sequence.step(t) for t in tokens[20:]]
        expected = [ours(torch.tensor([tokens[: i + 1]]), check.positions(0, i + 1),
                         logits_to_keep=1)[0, -1] for i in range(19, 40)]  # fmt: skip
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), atol=1e-5, rtol=0)


def test_prefill_then_decode_through_cache_without_a_switch(folders):
    """The model's own cache (no Sequence): YaRN, and LongRoPE all on one side."""
    for name in ("qwen2yarn", "phi4mini"):
        ours = loader.load(folders[name]).model
        tokens = check.tokens(1, 30, seed=5)
        with torch.no_grad():
            expected = ours(tokens, check.positions(0, 30))
            cache = make_cache(ours, batch_size=1, max_seq_len=64)
            prefill = ours(tokens[:, :20], check.positions(0, 20), cache)
            steps = [
                ours(tokens[:, i : i + 1], check.positions(i, 1), cache) for i in range(20, 30)
            ]
        got = torch.cat([prefill, *steps], dim=1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_greedy_ids_match_transformers_generate(pair):
    """24 prompt tokens + 16: LongRoPE's generation crosses 32 on the way."""
    ours, theirs = pair
    assert check.greedy(ours, PROMPT, 16) == check.hf_greedy(theirs, PROMPT, 16)


def test_batched_scheduler_equals_each_request_alone(folders):
    """Rows on either side of the switch batched together, one crossing it mid-way and
    one prompt prefilled in chunks across it: each gets the tokens it gets alone."""
    lm = pocketlm.load(folders["phi3"])
    prompts = [PROMPT[:5], PROMPT, PROMPT + PROMPT[:14], PROMPT[:3] * 12]
    alone = [lm.generate(ids, max_tokens=10, temperature=0).tokens for ids in prompts]
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=4, max_queue=8, prefill_chunk=16)
    scheduler.start()
    try:
        runs = [Run(ids, max_tokens=10, params=SamplingParams(temperature=0.0)) for ids in prompts]
        scheduler.submit([r.request for r in runs])
        assert [r.wait().tokens for r in runs] == alone
    finally:
        scheduler.stop()


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_prepared_and_quantized(folders, quantize):
    """fuse() keeps the stored fused layers; int8 within its rounding."""
    folder = folders["phi4mini"]
    reference = loader.load(folder).model
    prepared = loader.load(folder, prepare=True, quantize=quantize).model
    tokens = check.tokens(1, 40, seed=6)
    with torch.no_grad():
        expected, got = (
            reference(tokens, check.positions(0, 40)),
            prepared(tokens, check.positions(0, 40)),
        )
    if quantize is None:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    else:
        assert torch.corrcoef(torch.stack([got.ravel(), expected.ravel()]))[0, 1] > 0.999


def test_lora_targets_and_export_names_are_phi3s(folders):
    """LoRA's default targets reach the fused qkv_proj; export writes the keys
    transformers' Phi3ForCausalLM loads."""
    model = loader.load(folders["phi3"]).model
    assert {n.rpartition(".")[2] for n in target_linears(model, [])} == {"qkv_proj", "o_proj"}
    theirs = hf_model(folders["phi3"])
    assert set(hf_state_dict(model, model_type="phi3")) == set(theirs.state_dict())


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_converted_gguf_matches_transformers(name, conversions, folders):
    case, outtype = GGUF_CASES[name]
    gguf_file, folder = conversions[name].wait(), folders[case]
    ckpt = read_gguf(gguf_file)
    from_gguf = check_config(ckpt.config, source=gguf_file)
    from_folder = loader.load(folder).model.config
    assert from_gguf.rope_switch_length == from_folder.rope_switch_length
    assert from_gguf.rotary_dim == from_folder.rotary_dim
    assert from_gguf.sliding_window == from_folder.sliding_window
    if case.startswith("phi"):
        assert ckpt.architecture == "phi3" and "blk.1.attn_qkv.weight" in ckpt.tensors
        assert from_gguf.rope_scaling["rope_type"] == "longrope"
    else:
        assert ckpt.metadata["qwen2.rope.scaling.type"] == "yarn"
    theirs = hf_model(folder)
    if outtype != "f32":  # the converter rounded the matrices: compare on its own weights
        theirs.load_state_dict(check.hf_names(loader.load(gguf_file, dtype=torch.float32).model))
    ours = loader.load(gguf_file, dtype=torch.float32).model
    for start, n in ((0, 20), (0, 40), (200, 40)):
        tokens, positions = check.tokens(1, n, seed=7), check.positions(start, n)
        with torch.no_grad():
            expected = theirs(tokens, position_ids=positions).logits
            got = ours(tokens, positions)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert check.greedy(ours, PROMPT, 16) == check.hf_greedy(theirs, PROMPT, 16)


def test_converted_spm_vocabulary_loads(conversions):
    """The Phi-3 GGUF's SentencePiece vocabulary (Mistral's, padded to the embedding rows
    with the converter's [PAD] pieces) tokenizes as sentencepiece does."""
    import sentencepiece

    import vendor

    lm = pocketlm.load(conversions["phi3-q8_0"].wait(), dtype="fp32")
    processor = sentencepiece.SentencePieceProcessor(
        model_file=str(vendor.mistral_tokenizers() / "tokenizer.model.v1")
    )
    text = "Hello world, how are you?"
    assert lm.tokenizer.encode(text, add_bos=False) == processor.encode(text)


def test_converted_q8_0_runs_as_stored_and_as_int8(conversions):
    """Q8_0 kept as stored (fused qkv as one GGUFLinear) and straight into int8 agree with
    the same file dequantized, past the switch (correlation, as int8 activations round)."""
    gguf_file = conversions["phi3-q8_0"].wait()
    exact = loader.load(gguf_file, dtype=torch.float32).model
    tokens = check.tokens(1, 40, seed=8)
    with torch.no_grad():
        expected = exact(tokens, check.positions(0, 40))
        for quantize in (None, "int8"):
            got = loader.load(gguf_file, prepare=True, quantize=quantize).model(
                tokens, check.positions(0, 40)
            )
            assert torch.corrcoef(torch.stack([got.ravel(), expected.ravel()]))[0, 1] > 0.999


@pytest.mark.parametrize(
    ("scaling", "what"),
    [
        ({**_longrope(8), "long_factor": [1.0] * 7}, "long_factor"),
        ({**_longrope(8), "short_factor": "1.0"}, "short_factor"),
        (dict(rope_type="yarn", factor=4.0, beta_fast=float("nan")), "beta_fast"),
        (dict(rope_type="yarn", factor=-1.0), "factor"),
        (dict(rope_type="yarn", factor=4.0, truncate="yes"), "truncate"),
    ],
)
def test_bad_rope_scaling_is_one_line(tmp_path, scaling, what):
    config = dict(model_type="phi3", hidden_size=64, num_attention_heads=4, rope_scaling=scaling)
    if scaling["rope_type"] == "yarn":
        config["model_type"] = "qwen2"
    with pytest.raises(PocketLMError, match=what) as error:
        check_config(config, source=tmp_path)
    assert "\n" not in str(error.value)


def test_phi3_older_rope_names_are_longrope(tmp_path):
    """Phi-3's first configs said "su" (and "yarn"): transformers reads both as longrope,
    with the top-level original_max_position_embeddings."""
    for kind in ("su", "yarn"):
        scaling = {**_longrope(8), "type": kind}
        del scaling["rope_type"]
        config = dict(model_type="phi3", hidden_size=64, num_attention_heads=4,
                      rope_scaling=scaling, original_max_position_embeddings=48)  # fmt: skip
        checked = check_config(config, source=tmp_path)
        assert checked.rope_scaling["rope_type"] == "longrope"
        assert checked.rope_switch_length == 48
