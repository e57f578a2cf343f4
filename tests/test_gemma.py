"""Gemma, Gemma 2 and Gemma 3 (text) natively: the Llama block with GemmaConfig's switches,
against `transformers`' own Gemma classes on the same random weights, from the HF folder
and from the GGUF llama.cpp's `convert_hf_to_gguf.py` makes of it (tests/convert.py, with
Mistral's SentencePiece tokenizer.model as the vocabulary it reads).

Each checkpoint turns its family's switches on where a 40-token prompt reaches them: odd
head counts, GQA, head_dim unlike hidden / heads, random norm weights (transformers starts
Gemma's at 0, i.e. a scale of 1), weights large enough that soft caps of 5 bend the scores
and logits, a sliding window of 8 on Gemma 2's even layers and on five of Gemma 3's six,
Gemma 3's linear rope scaling on its global layer and a rotary base of its own on the
sliding ones, query_pre_attn_scalar unlike head_dim. llama.cpp's GGUF carries no
query_pre_attn_scalar (llama.cpp scales by head_dim, as pocketlm then does), so the GGUF's
oracle is transformers with that one key set to head_dim.
"""

from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM

import family_checks as check
from checkpoints import hf_model
from convert import Conversion, make_convertible
from pocketlm.errors import CorruptModelError, PocketLMError
from pocketlm.models import make_cache
from pocketlm.models.rope import rope_inv_freq
from pocketlm.serve.scheduler import Scheduler
from pocketlm.weights import card, loader
from pocketlm.weights.config import check_config, read_config
from pocketlm.weights.gguf import read_gguf

WIDE = dict(initializer_range=0.08, max_position_embeddings=256, intermediate_size=96)
CASES = {
    "gemma": dict(hidden_size=60, num_hidden_layers=2, num_attention_heads=5,
                  num_key_value_heads=1, head_dim=16, **WIDE),
    "gemma2": dict(hidden_size=72, num_hidden_layers=2, num_attention_heads=9,
                   num_key_value_heads=3, head_dim=12, sliding_window=8,
                   query_pre_attn_scalar=20, attn_logit_softcapping=5.0,
                   final_logit_softcapping=5.0, **WIDE),
    "gemma3_text": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                        num_key_value_heads=1, head_dim=32, sliding_window=8,
                        query_pre_attn_scalar=20, final_logit_softcapping=5.0,
                        rope_parameters={
                            "full_attention": {"rope_type": "linear", "factor": 4.0,
                                               "rope_theta": 100000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                        }, **WIDE),
}  # fmt: skip
# One conversion per family (each compared with transformers on the file's own weights,
# read back to fp32, and run as stored): F32, F16, Q8_0 (Gemma 3's widths are whole Q8_0
# blocks of 32, or the converter would keep its matrices in F16).
GGUF_CASES = {"gemma": "f32", "gemma2": "f16", "gemma3_text": "q8_0"}
ARCHS = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}
PROMPT = [1, 15043, 3186, 29892, 920, 526, 366, 29973, 306, 626, 1781, 29889]  # > window
_tokens = partial(check.tokens, low=3, vocab=32000)  # Mistral's vocabulary, past ids 0-2


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """Each family's HF folder (random weights, saved by transformers' own class)."""
    made = {}
    for name, config in CASES.items():
        folder = tmp_path_factory.mktemp(name)
        made[name] = make_convertible(folder, model_type=name, **config)
        # Random RMSNorm weights: transformers starts Gemma's at 0 (a scale of 1), where a
        # norm left out, swapped or read without its offset would hide.
        check.randomize_norms(folder, rms=True, center=0.0)
    return made


@pytest.fixture(scope="module")
def conversions(folders) -> dict[str, Conversion]:
    """Every GGUF case's conversion started at once (they overlap)."""
    return {
        name: Conversion(folders[name], folders[name].parent / f"{name}-{outtype}.gguf",
                         outtype=outtype)
        for name, outtype in GGUF_CASES.items()
    }  # fmt: skip


@pytest.fixture(scope="module", params=list(CASES))
def family(request, folders, conversions):  # conversions: started before the slow tests
    return request.param, *check.load_pair(folders[request.param])


def test_each_family_has_its_switches_on(family):
    name, ours, theirs = family
    c = ours.config
    assert c.model_type == name and c.unit_offset_norms and c.scale_embeddings
    assert c.head_dim != c.hidden_size // c.num_attention_heads
    assert c.num_attention_heads % 2 and c.num_key_value_heads < c.num_attention_heads
    names = {n for n, _ in ours.named_parameters()}
    assert ("model.layers.1.pre_feedforward_layernorm.weight" in names) == (name != "gemma")
    assert ("model.layers.1.self_attn.q_norm.weight" in names) == (name == "gemma3_text")
    expected_windows = {"gemma": [None] * 2, "gemma2": [8, None], "gemma3_text": [8] * 5 + [None]}
    assert [b.self_attn.window for b in ours.model.layers] == expected_windows[name]
    assert c.attention_softcap == (5.0 if name == "gemma2" else None)
    assert c.final_softcap == (None if name == "gemma" else 5.0)
    assert c.attention_scale == (None if name == "gemma" else 20**-0.5)
    if name == "gemma3_text":
        assert c.local_rope_theta == 1000.0 and c.rope_theta == 100000.0
        assert c.rope_scaling["rope_type"] == "linear"
    # The caps bend what they cap: logits reach well past half the cap.
    with torch.no_grad():
        logits = theirs(_tokens(1, 40, seed=9)).logits
    if name != "gemma":
        assert logits.abs().max() > 2.5


def test_logits_match_transformers_at_several_positions(family):
    _, ours, theirs = family
    tokens = _tokens(2, 40, seed=1)
    for start in (0, 17, 200):
        positions = check.positions(start, 40, rows=2)
        with torch.no_grad():
            expected = theirs(tokens, position_ids=positions).logits
            got = ours(tokens, positions)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_prefill_then_decode_through_cache_matches(family):
    """20 tokens prefilled, then 20 decoded one by one: past the window of 8 on both."""
    _, ours, theirs = family
    tokens = _tokens(1, 40, seed=2)
    with torch.no_grad():
        expected = theirs(tokens).logits
        uncached = ours(tokens, check.positions(0, 40))
        cache = make_cache(ours, batch_size=1, max_seq_len=64)
        prefill = ours(tokens[:, :20], check.positions(0, 20), cache)
        steps = [ours(tokens[:, i : i + 1], check.positions(i, 1), cache) for i in range(20, 40)]
    cached = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, expected, atol=1e-4, rtol=0)


def test_greedy_ids_match_transformers_generate(family):
    _, ours, theirs = family
    assert check.greedy(ours, PROMPT, 16) == check.hf_greedy(theirs, PROMPT, 16)


def test_batched_scheduler_equals_each_request_alone(family, folders):
    """Rows at different positions in one batch (each crossing the window) give each
    request the tokens it gets alone."""
    name, ours, _ = family
    tokenizer = loader.load(folders[name]).tokenizer
    prompts = [PROMPT, PROMPT[:3], _tokens(1, 21, seed=3)[0].tolist(), PROMPT[5:]]
    alone = [check.greedy(ours, ids, 10) for ids in prompts]
    runs = [check.Run(ids, max_tokens=10) for ids in prompts]
    scheduler = Scheduler(ours, tokenizer, max_batch=4, max_queue=8)
    scheduler.start()
    try:
        scheduler.submit([r.request for r in runs])
        assert [r.wait(30.0) for r in runs] == alone
    finally:
        scheduler.stop()


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_converted_gguf_matches_transformers(name, conversions, folders):
    """The file read back to fp32 against transformers on those very weights (F16 and
    Q8_0 rounded them; F32 did not, and is compared with the folder's own), then the
    default load (matrices as stored, fused) against that: F32 exactly; F16 prefills in
    bf16 on CPU and Q8_0 rounds the activations to int8, so those by correlation."""
    outtype = GGUF_CASES[name]
    gguf_file, folder = conversions[name].wait(), folders[name]
    ckpt = read_gguf(gguf_file)
    assert ckpt.architecture == ARCHS[name] and "output.weight" not in ckpt.tensors
    assert ckpt.tensors["blk.0.attn_q.weight"].ggml_type == outtype.upper()
    from_gguf = check_config(ckpt.config, source=gguf_file)
    from_folder = check_config(read_config(folder), source=folder)
    for key in ("layer_windows", "attention_softcap", "final_softcap", "qk_norm", "head_dim",
                "local_rope_theta", "sandwich_norms"):  # fmt: skip
        assert getattr(from_gguf, key) == getattr(from_folder, key), key
    assert torch.equal(rope_inv_freq(from_gguf), rope_inv_freq(from_folder))
    # llama.cpp scales the scores by head_dim ** -0.5 (no key carries query_pre_attn_scalar).
    extra = {} if name == "gemma" else {"query_pre_attn_scalar": from_folder.head_dim}
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    ours = loader.load(gguf_file, dtype=torch.float32).model
    if outtype != "f32":  # the converter rounded the matrices: compare on its own weights
        theirs.load_state_dict(check.hf_names(ours))
    stored = loader.load(gguf_file, prepare=True).model
    tokens = _tokens(2, 40, seed=4)
    for start in (0, 200):
        positions = check.positions(start, 40, rows=2)
        with torch.no_grad():
            expected = theirs(tokens, position_ids=positions).logits
            got, got_stored = ours(tokens, positions), stored(tokens, positions)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        if outtype == "f32":
            torch.testing.assert_close(got_stored, expected, atol=1e-4, rtol=0)
        else:
            pair = torch.stack([got_stored.ravel(), expected.ravel()])
            assert torch.corrcoef(pair)[0, 1] > 0.999
    assert check.greedy(ours, PROMPT, 16) == check.hf_greedy(theirs, PROMPT, 16)


def test_q8_0_gguf_straight_into_int8(conversions):
    """Q8_0 loaded into pocketlm's int8 layers with the file's own codes agrees with the
    file dequantized to fp32 within the int8 rounding of its activations (random weights
    have near ties, so no ids)."""
    gguf_file = conversions["gemma3_text"].wait()
    prepared = loader.load(gguf_file, prepare=True, quantize="int8").model
    exact = loader.load(gguf_file, dtype=torch.float32).model
    tokens = _tokens(1, 40, seed=5)
    with torch.no_grad():
        got, expected = (
            prepared(tokens, check.positions(0, 40)),
            exact(tokens, check.positions(0, 40)),
        )
    assert torch.corrcoef(torch.stack([got.ravel(), expected.ravel()]))[0, 1] > 0.999


def test_the_folders_are_native_and_counted(folders):
    for name, folder in folders.items():
        assert card.describe(folder).native
        expected = sum(p.numel() for p in hf_model(folder).parameters())  # tied: once
        assert card.count_parameters(read_config(folder)) == expected, name


@pytest.mark.parametrize(
    ("config", "error"),
    [
        (dict(use_bidirectional_attention=True), PocketLMError),
        (dict(layer_types=["sliding_attention"]), CorruptModelError),
        (dict(final_logit_softcapping=0.0), CorruptModelError),
    ],
)
def test_configs_pocketlm_cannot_run_are_refused_in_one_line(tmp_path, config, error):
    base = dict(model_type="gemma3_text", hidden_size=64, num_attention_heads=4,
                num_hidden_layers=2)  # fmt: skip
    with pytest.raises(error) as caught:
        check_config({**base, **config}, source=tmp_path)
    assert "\n" not in str(caught.value)
