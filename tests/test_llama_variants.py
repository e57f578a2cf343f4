"""SmolLM3, OLMo 2 and Granite natively: switches on the Llama block, against
`transformers`' own classes on the same random weights, from the HF folder and from the
GGUFs llama.cpp's `convert_hf_to_gguf.py` makes of it (tests/convert.py; GPT-2's
vocabulary, which the converter accepts for all three).

Each family's switch is on at a size a short prompt reaches: SmolLM3 with 4 layers, the
last of them NoPE; OLMo 2's post-norms and whole-projection q/k norms; Granite's four
multipliers far from 1. Odd KV head counts and GQA (6/3, 3/1, 6/2 heads), norm weights
random (transformers starts them at 1, where a missing or misplaced norm hides)."""

import pytest
import torch

import family_checks as check
from checkpoints import hf_model
from convert import Conversion, make_convertible
from pocketlm.errors import PocketLMError
from pocketlm.models import make_cache
from pocketlm.weights import card, loader
from pocketlm.weights.config import check_config, read_config
from pocketlm.weights.gguf import read_gguf
from pocketlm.weights.gguf_config import gguf_config

SHAPE = dict(hidden_size=96, intermediate_size=160, pad_token_id=None)  # Q8_0: rows of 32
CASES = {
    "smollm3": dict(num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3,
                    rope_theta=10000.0, tie_word_embeddings=True),
    "olmo2": dict(num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1),
    "granite": dict(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                    embedding_multiplier=12.0, attention_multiplier=0.07,
                    residual_multiplier=0.22, logits_scaling=0.25),
}  # fmt: skip
# family -> the exact outtype beside Q8_0 (both overlap in the background).
EXACT = {"smollm3": "f16", "olmo2": "f32", "granite": "f32"}
# What the converter writes under "{arch}." beyond the shape every Llama has.
EXTRA_KEYS = {
    "smollm3": {"vocab_size", "rope.dimension_count"},
    "olmo2": set(),
    "granite": {"vocab_size", "rope.dimension_count", "attention.scale", "embedding_scale",
                "residual_scale", "logit_scale"},
}  # fmt: skip
SHAPE_KEYS = {"block_count", "context_length", "embedding_length", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv",
              "attention.layer_norm_rms_epsilon", "rope.freq_base"}  # fmt: skip
PROMPT = [15496, 995, 11, 703, 389, 345]  # "Hello world, how are you" in GPT-2's ids
PROMPTS = [[464, 3290], [40, 588, 257, 1310, 286], [818]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """Each family's HF folder (random weights and norms, saved by transformers)."""
    made = {}
    for family, config in CASES.items():
        folder = tmp_path_factory.mktemp(family)
        made[family] = make_convertible(folder, model_type=family, **SHAPE, **config)
        # Norm weights random, and q and k 8 times larger: at transformers' initial scale
        # the attention is near uniform, so rotary (SmolLM3's NoPE layer) and Granite's
        # attention scale would hardly show in the logits.
        check.randomize_norms(folder, rms=True, scale=(("q_proj.weight", "k_proj.weight"), 8))
    return made


@pytest.fixture(scope="module")
def conversions(folders) -> dict[tuple[str, str], Conversion]:
    """Every family's two conversions, started at once."""
    return {
        (family, outtype): Conversion(
            folder, folder.parent / f"{family}-{outtype}.gguf", outtype=outtype
        )
        for family, folder in folders.items()
        for outtype in (EXACT[family], "q8_0")
    }


@pytest.fixture(scope="module", params=list(CASES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pair(family, folders):
    return check.load_pair(folders[family])


def _uncached_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy by the whole sequence each step, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), check.positions(0, len(ids)))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def _assert_logits_match(ours, theirs, *, seed: int, starts=(0, 17, 200), atol=1e-4) -> None:
    tokens = check.tokens(2, 40, seed=seed)
    for start in starts:
        positions = check.positions(start, 40, rows=2)
        with torch.no_grad():
            expected = theirs(tokens, position_ids=positions).logits
            got = ours(tokens, positions)
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def test_each_folder_turns_its_switch_on(folders):
    models = {family: loader.load(folder).model for family, folder in folders.items()}
    smollm3, olmo2, granite = (models[f].config for f in ("smollm3", "olmo2", "granite"))
    assert smollm3.no_rope_layers == [1, 1, 1, 0] and smollm3.input_norms
    layers = models["smollm3"].model.layers
    assert [block.self_attn.rotary for block in layers] == [True, True, True, False]
    assert olmo2.sandwich_norms and not olmo2.input_norms
    assert olmo2.qk_norm_across_heads and not olmo2.qk_norm
    block = models["olmo2"].model.layers[1]
    assert isinstance(block.input_layernorm, torch.nn.Identity)
    assert isinstance(block.pre_feedforward_layernorm, torch.nn.Identity)
    assert block.self_attn.q_norm.weight.shape == (96,)  # 3 heads of 32, normed as one
    assert block.self_attn.k_norm.weight.shape == (32,)  # the one KV head
    assert block.post_feedforward_layernorm.weight.shape == (96,)
    assert (granite.embedding_multiplier, granite.attention_multiplier) == (12.0, 0.07)
    assert (granite.residual_multiplier, granite.logits_scaling) == (0.22, 0.25)
    for family in ("smollm3", "olmo2"):  # the multipliers are Granite's alone
        config = models[family].config
        assert (config.attention_multiplier, config.logits_scaling) == (None, 1.0)
    assert all(card.describe(folder).native for folder in folders.values())


def test_parameter_count_is_transformers_own(folders):
    for folder in folders.values():
        expected = sum(p.numel() for p in hf_model(folder).parameters())
        assert card.count_parameters(read_config(folder)) == expected


def test_logits_match_transformers_at_several_positions(pair, family):
    ours, theirs = pair
    _assert_logits_match(ours, theirs, seed=1)


def test_each_switch_shows_in_the_logits(pair, family):
    """The oracle tells each switch apart: turned off in our model (SmolLM3's NoPE layer
    rotated, OLMo 2's q/k norms left out, Granite's residual multiplier 1), the logits
    are far from transformers'."""
    ours, theirs = pair
    layers = ours.model.layers
    if family == "smollm3":
        switches = [(layers[3].self_attn, "rotary", True)]
    elif family == "olmo2":
        switches = [(block.self_attn, "qk_norm_across_heads", False) for block in layers]
    else:
        switches = [(block, "residual_multiplier", 1.0) for block in layers]
    tokens = check.tokens(1, 40, seed=6)
    with torch.no_grad():
        expected = theirs(tokens).logits
        saved = [getattr(module, name) for module, name, _ in switches]
        try:
            for module, name, off in switches:
                setattr(module, name, off)
            got = ours(tokens, check.positions(0, 40))
        finally:
            for (module, name, _), value in zip(switches, saved, strict=True):
                setattr(module, name, value)
    assert (got - expected).abs().max() > 100 * 1e-4


def test_prefill_then_decode_through_cache_matches(pair):
    ours, theirs = pair
    tokens = check.tokens(1, 30, seed=2)
    with torch.no_grad():
        expected = theirs(tokens).logits
        cache = make_cache(ours, batch_size=1, max_seq_len=64)
        prefill = ours(tokens[:, :20], check.positions(0, 20), cache)
        steps = [ours(tokens[:, i : i + 1], check.positions(i, 1), cache) for i in range(20, 30)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), expected, atol=1e-4, rtol=0)


def test_greedy_ids_match_transformers_cached_and_uncached(pair):
    ours, theirs = pair
    expected = check.hf_greedy(theirs, PROMPT, 16)
    assert check.greedy(ours, PROMPT, 16) == expected
    assert _uncached_greedy(ours, PROMPT, 16) == expected


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_prepared_fused_and_quantized(family, folders, quantize):
    """Fused q/k/v and gate/up (the switches apply after the fused matmuls): fp32 exact;
    int8 and int4 within their rounding (measured correlation with fp32: int8 0.9991 to
    0.99999, int4 0.94 to 0.99998, the sharpened attention magnifying it)."""
    reference = loader.load(folders[family]).model
    prepared = loader.load(folders[family], prepare=True, quantize=quantize).model
    block = prepared.model.layers[0]
    assert block.self_attn.qkv_proj is not None and block.mlp.gate_up_proj is not None
    tokens = check.tokens(1, 24, seed=3)
    with torch.no_grad():
        expected, got = (
            reference(tokens, check.positions(0, 24)),
            prepared(tokens, check.positions(0, 24)),
        )
    if quantize is None:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    else:
        correlation = torch.corrcoef(torch.stack([got.ravel(), expected.ravel()]))[0, 1]
        assert correlation > {"int8": 0.998, "int4": 0.9}[quantize]


def test_batched_int8_greedy_equals_each_request_alone(family, folders):
    """The scheduler's ragged batch (int8 weights) gives each request its tokens alone."""
    check.assert_batched_equals_alone(
        folders[family], prompts=PROMPTS, max_tokens=8, timeout=30, quantize="int8"
    )


def test_converted_gguf_matches_transformers(family, conversions, folders):
    """The converter's F32 (F16: compared on its own rounded weights) GGUF: the family's
    metadata and tensors read, q/k un-permuted where llama.cpp permuted them (SmolLM3 and
    Granite, not OLMo 2), logits within 1e-4 of transformers and greedy ids equal."""
    outtype = EXACT[family]
    gguf_file, folder = conversions[family, outtype].wait(), folders[family]
    ckpt = read_gguf(gguf_file)
    assert ckpt.architecture == family
    written = {k.removeprefix(f"{family}.") for k in ckpt.metadata if k.startswith(f"{family}.")}
    assert written == SHAPE_KEYS | EXTRA_KEYS[family]
    if family == "olmo2":
        assert "blk.1.post_ffw_norm.weight" in ckpt.tensors
        assert "blk.1.attn_norm.weight" not in ckpt.tensors
    from_gguf = check_config(ckpt.config, source=gguf_file)
    from_folder = check_config(read_config(folder), source=folder)
    for key in ("layer_rotary", "input_norms", "sandwich_norms", "qk_norm_across_heads",
                "tie_word_embeddings"):  # fmt: skip
        assert getattr(from_gguf, key) == getattr(from_folder, key), key
    for key in ("embedding_multiplier", "attention_multiplier", "residual_multiplier",
                "logits_scaling"):  # GGUF keeps them as float32  # fmt: skip
        expected = getattr(from_folder, key)  # None: not Granite
        assert getattr(from_gguf, key) == (expected and pytest.approx(expected, rel=1e-7)), key
    theirs, ours = hf_model(folder), loader.load(gguf_file, dtype=torch.float32).model
    if outtype == "f16":  # the converter rounded the matrices: compare on its own weights
        theirs.load_state_dict(check.hf_names(ours))
    _assert_logits_match(ours, theirs, seed=4, starts=(0, 200))
    assert check.greedy(ours, PROMPT, 16) == check.hf_greedy(theirs, PROMPT, 16)


def test_converted_q8_0_runs_as_stored(family, conversions):
    """Q8_0 loaded by default (kept as stored, fused and prepared) agrees with the same
    file dequantized to fp32 within the int8 rounding of its activations (measured
    correlation 0.9995 and more; random weights have near ties, so no ids), and decodes
    through its cache as it prefills."""
    gguf_file = conversions[family, "q8_0"].wait()
    exact = loader.load(gguf_file, dtype=torch.float32).model
    stored = loader.load(gguf_file, prepare=True).model
    assert type(stored.model.layers[0].self_attn.qkv_proj).__name__ == "GGUFLinear"
    tokens = check.tokens(1, 24, seed=5)
    with torch.no_grad():
        expected, got = (
            exact(tokens, check.positions(0, 24)),
            stored(tokens, check.positions(0, 24)),
        )
        cache = make_cache(stored, batch_size=1, max_seq_len=32)
        prefill = stored(tokens[:, :16], check.positions(0, 16), cache)
        steps = [stored(tokens[:, i : i + 1], check.positions(i, 1), cache) for i in range(16, 24)]
    assert torch.corrcoef(torch.stack([got.ravel(), expected.ravel()]))[0, 1] > 0.999
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), got, atol=1e-4, rtol=1e-3)


def test_granite_gguf_scales_default_as_llama_cpp_and_the_logit_scale_is_required(
    conversions, tmp_path
):
    """llama.cpp reads granite.logit_scale always and the other three scales only where
    present (unset: 1, and attention 1/sqrt(head_dim)); so does pocketlm."""
    ckpt = read_gguf(conversions["granite", "f32"].wait())
    optional = ("granite.embedding_scale", "granite.attention.scale", "granite.residual_scale")
    meta = {k: v for k, v in ckpt.metadata.items() if k not in optional}
    config = gguf_config("granite", meta, tensors=ckpt.tensors, path=tmp_path)
    assert (config["embedding_multiplier"], config["residual_multiplier"]) == (1.0, 1.0)
    assert config["attention_multiplier"] == 16**-0.5  # head_dim 96 / 6
    del meta["granite.logit_scale"]
    with pytest.raises(PocketLMError, match="granite.logit_scale is missing") as error:
        gguf_config("granite", meta, tensors=ckpt.tensors, path=tmp_path)
    assert "\n" not in str(error.value)


def test_an_olmo3_conversion_is_refused_in_one_line(conversions, tmp_path):
    """llama.cpp converts OLMo 3 as "olmo2" with a sliding window on three layers in four
    (and their own rotary), which pocketlm's Llama does not run: refused, not misread."""
    ckpt = read_gguf(conversions["olmo2", "f32"].wait())
    meta = {**ckpt.metadata, "olmo2.attention.sliding_window": 4096}
    with pytest.raises(PocketLMError, match="OLMo 3") as error:
        gguf_config("olmo2", meta, tensors=ckpt.tensors, path=tmp_path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(model_type="smollm3", use_sliding_window=True, sliding_window=8),
         "use_sliding_window"),
        (dict(model_type="smollm3", no_rope_layers=[1, 0]), "no_rope_layers"),
        (dict(model_type="smollm3", no_rope_layers=[1, 2, 1, 0]), "no_rope_layers"),
        (dict(model_type="granite", logits_scaling=0), "logits_scaling"),
        (dict(model_type="granite", attention_multiplier="big"), "attention_multiplier"),
    ],
)  # fmt: skip
def test_a_config_pocketlm_cannot_run_is_refused_in_one_line(tmp_path, config, message):
    config = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=4, **config)
    with pytest.raises(PocketLMError, match=message) as error:
        check_config(config, source=tmp_path)
    assert "\n" not in str(error.value)
