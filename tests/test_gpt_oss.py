"""GPT-OSS natively (models/gpt_oss.py: the Llama block, attention sinks, every layer a
SparseMoE with router and expert biases and the clamped SwiGLU), against transformers' own
GptOssForCausalLM on the same random weights, from the HF folder (experts fused, gate and
up interleaved, as transformers saves them) and from the GGUF llama.cpp's
`convert_hf_to_gguf.py` makes of it (tests/convert.py; GPT-2's vocabulary, which the
converter knows, in place of o200k). 6 heads of 16 over 2 KV heads beside hidden 64; 4
layers alternating a window of 8 with full attention; 6 experts, top 2; sinks, biases and
norms random; expert weights large enough that swiglu_limit (7, what llama.cpp assumes)
clamps; YaRN rotary as in every released checkpoint."""

import json
import threading

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoints import hf_model, make_llama, write_gguf
from convert import Conversion, make_convertible
from pocketlm.errors import PocketLMError
from pocketlm.generate.params import GenerationParams
from pocketlm.generate.sequence import Sequence
from pocketlm.generate.stream import generate_tokens
from pocketlm.models import make_cache
from pocketlm.models.moe import SparseMoE
from pocketlm.sampling import SamplingParams
from pocketlm.serve.scheduler import Request, Scheduler
from pocketlm.weights import loader
from pocketlm.weights.config import check_config
from pocketlm.weights.gguf import read_gguf

# Rotary as GptOssConfig's defaults (every released checkpoint's): YaRN, factor 32 over an
# original 4096 of 131072 positions, beta 32/1, not truncated, theta 150000.
CONFIG = dict(model_type="gpt_oss", num_hidden_layers=4, num_attention_heads=6,
              num_key_value_heads=2, head_dim=16, intermediate_size=64, num_local_experts=6,
              num_experts_per_tok=2, sliding_window=8, max_position_embeddings=131072)  # fmt: skip
PROMPT = [15496, 995, 11, 703, 389, 345]
LIMIT = 7.0  # HF's default swiglu_limit, and the one llama.cpp hard-codes


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = make_convertible(tmp_path_factory.mktemp("gpt_oss"), **CONFIG)
    _randomize(folder)
    return folder


def _randomize(folder) -> None:
    """Norms, sinks and biases random (transformers starts them at 1 and 0), the router
    10x larger (clear routing margins), the experts' gate_up 20x (so the clamp at 7 is
    reached; their down_proj as it was, so the residual stream stays of a size where
    quantized paths route as float does)."""
    model = hf_model(folder)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=generator))
            elif name.endswith(("sinks", "bias")):
                p.copy_(torch.randn(p.shape, generator=generator))
            elif name.endswith("router.weight"):
                p.mul_(10)
            elif name.endswith("experts.gate_up_proj"):
                p.mul_(20)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def conversions(folder):
    """The converter's F32 and Q8_0 files, started at once (they overlap the HF tests)."""
    return {
        outtype: Conversion(folder, folder.parent / f"gpt_oss-{outtype}.gguf", outtype=outtype)
        for outtype in ("f32", "q8_0")
    }


@pytest.fixture(scope="module")
def models(folder, conversions):
    return loader.load(folder).model, hf_model(folder)


def _tokens(rows: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 50257, (rows, n), generator=torch.Generator().manual_seed(seed))


def _positions(start: int, n: int, rows: int = 1) -> torch.Tensor:
    return torch.arange(start, start + n)[None].expand(rows, n)


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    params = GenerationParams(SamplingParams(temperature=0.0), max_tokens=n)
    return [s.token for s in generate_tokens(Sequence(model), prompt, params)]


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.ravel(), b.ravel()]))[0, 1].item()


def test_structure_from_the_fused_interleaved_checkpoint(models, folder):
    """Every layer a SparseMoE with a router bias, windows 8/full/8/full, a sink per
    head; the folder holds transformers' fused expert tensors, not per-expert ones."""
    ours, _ = models
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.router.bias",
            "model.layers.0.self_attn.sinks"} <= keys  # fmt: skip
    layers = ours.model.layers
    assert all(isinstance(b.mlp, SparseMoE) and b.mlp.gate.bias is not None for b in layers)
    assert [b.self_attn.window for b in layers] == [8, None, 8, None]
    assert layers[0].self_attn.sinks.shape == (6,) and layers[0].self_attn.o_proj.bias is not None
    assert layers[0].mlp.experts[0].gate_proj.bias.shape == (64,)
    scaling = ours.config.rope_scaling
    assert (scaling["rope_type"], scaling["factor"], scaling["truncate"]) == ("yarn", 32.0, False)


def test_logits_match_transformers_and_the_clamp_is_reached(models):
    ours, theirs = models
    reached = {"gate": 0, "up": 0}
    gates = [e.gate_proj for b in ours.model.layers for e in b.mlp.experts]
    ups = [e.up_proj for b in ours.model.layers for e in b.mlp.experts]
    hooks = [g.register_forward_hook(lambda m, a, out: _add(reached, "gate", out > LIMIT))
             for g in gates]  # fmt: skip
    hooks += [u.register_forward_hook(lambda m, a, out: _add(reached, "up", out.abs() > LIMIT))
              for u in ups]  # fmt: skip
    tokens = _tokens(2, 16, seed=1)
    try:
        for start in (0, 17, 200):  # past the window of 8
            positions = _positions(start, 16, rows=2)
            with torch.no_grad():
                expected = theirs(tokens, position_ids=positions).logits
                got = ours(tokens, positions)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    finally:
        for hook in hooks:
            hook.remove()
    assert reached["gate"] > 0 and reached["up"] > 0, reached


def _add(counts: dict, key: str, hits: torch.Tensor) -> None:
    counts[key] += int(hits.sum())


def test_a_long_prompt_in_query_chunks(models):
    """300 positions: the explicit attention (sinks) takes its queries in chunks of 256."""
    ours, theirs = models
    tokens = _tokens(1, 300, seed=13)
    with torch.no_grad():
        expected = theirs(tokens).logits
        torch.testing.assert_close(ours(tokens, _positions(0, 300)), expected, atol=1e-4, rtol=0)


def test_prefill_then_decode_through_cache_matches(models):
    ours, theirs = models
    tokens = _tokens(1, 30, seed=2)
    with torch.no_grad():
        expected = theirs(tokens).logits
        cache = make_cache(ours, batch_size=1, max_seq_len=64)
        prefill = ours(tokens[:, :20], _positions(0, 20), cache)
        steps = [ours(tokens[:, i : i + 1], _positions(i, 1), cache) for i in range(20, 30)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), expected, atol=1e-4, rtol=0)


def test_greedy_ids_match_transformers_generate(models):
    ours, theirs = models
    assert _greedy(ours, PROMPT, 16) == _hf_greedy(theirs, PROMPT, 16)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_prepared_fused_and_quantized(folder, models, quantize):
    """Fused q/k/v and each expert's gate/up (biases with them); int8 experts, the router
    and sinks left float."""
    reference, _ = models
    prepared = loader.load(folder, prepare=True, quantize=quantize).model
    expert = prepared.model.layers[0].mlp.experts[0]
    assert expert.gate_up_proj is not None and prepared.model.layers[0].self_attn.qkv_proj
    assert prepared.model.layers[0].mlp.gate.weight.dtype == torch.float32
    tokens = _tokens(1, 24, seed=6)
    with torch.no_grad():
        expected, got = reference(tokens, _positions(0, 24)), prepared(tokens, _positions(0, 24))
    if quantize is None:
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    else:
        assert _correlation(got, expected) > 0.999


def test_batched_scheduler_equals_each_request_alone(folder):
    """Rows of several requests in one batch (each its own positions, windows and sinks)
    give each request's tokens alone."""
    model = loader.load(folder, prepare=True).model
    lm = loader.load(folder)
    prompts = [[464, 3290], [15496, 995, 11], [40, 588, 257, 1310, 286, 3290, 11, 257, 1310], [818]]
    alone = [_greedy(model, ids, 8) for ids in prompts]
    scheduler = Scheduler(model, lm.tokenizer, max_batch=4, max_queue=8)
    scheduler.start()
    got = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def emitter(i):
        def emit(event):
            if event.token is not None:
                got[i].append(event.token)
            if event.finish_reason is not None:
                done[i].set()

        return emit

    try:
        params = GenerationParams(SamplingParams(temperature=0.0), max_tokens=8)
        scheduler.submit([Request(prompt_ids=ids, params=params, emit=emitter(i))
                          for i, ids in enumerate(prompts)])  # fmt: skip
        assert all(d.wait(30) for d in done)
    finally:
        scheduler.stop()
    assert got == alone


def test_other_layer_types_are_read(tmp_path):
    """layer_types decides which layers slide (here 0 and 3, not HF's even default)."""
    types = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    folder = make_llama(tmp_path, **{**CONFIG, "layer_types": types})
    _randomize(folder)
    ours, theirs = loader.load(folder).model, hf_model(folder)
    assert [b.self_attn.window for b in ours.model.layers] == [8, None, None, 8]
    tokens = _tokens(1, 24, seed=3)
    with torch.no_grad():
        expected = theirs(tokens, position_ids=_positions(0, 24)).logits
        torch.testing.assert_close(ours(tokens, _positions(0, 24)), expected, atol=1e-4, rtol=0)


def test_converted_f32_gguf_matches_transformers(conversions, models):
    """The converter's tensors (sinks, post_attention_norm, router and expert biases,
    gate and up de-interleaved into 3-D tensors, q/k not permuted) come back in place."""
    gguf_file = conversions["f32"].wait()
    ckpt = read_gguf(gguf_file)
    assert ckpt.architecture == "gpt-oss" and "blk.0.attn_sinks.weight" in ckpt.tensors
    config = check_config(ckpt.config, source=gguf_file)
    assert (config.model_type, config.n_experts, config.layer_windows) == (
        "gpt_oss", 6, [8, None, 8, None])  # fmt: skip
    scaling = config.rope_scaling  # from the file's yarn keys, unrounded as GPT-OSS is
    assert (scaling["rope_type"], scaling["factor"], scaling["truncate"]) == ("yarn", 32.0, False)
    assert config.rope_theta == 150000.0
    reference, theirs = models
    ours = loader.load(gguf_file, dtype=torch.float32).model
    expected_state = reference.state_dict()
    for key, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, expected_state[key], atol=0, rtol=0, msg=key)
    tokens = _tokens(2, 16, seed=7)
    for start in (0, 200):
        positions = _positions(start, 16, rows=2)
        with torch.no_grad():
            expected = theirs(tokens, position_ids=positions).logits
            torch.testing.assert_close(ours(tokens, positions), expected, atol=1e-4, rtol=0)
    assert _greedy(ours, PROMPT, 16) == _hf_greedy(theirs, PROMPT, 16)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_converted_q8_0_gguf_as_stored_and_int8(conversions, quantize):
    """The default load (each expert's Q8_0 matrix a GGUFLinear on its slice of the 3-D
    tensor) and Q8_0 into int8 agree with the same file dequantized to fp32."""
    gguf_file = conversions["q8_0"].wait()
    assert read_gguf(gguf_file).tensors["blk.1.ffn_gate_exps.weight"].ggml_type == "Q8_0"
    prepared = loader.load(gguf_file, prepare=True, quantize=quantize).model
    exact = loader.load(gguf_file, dtype=torch.float32).model
    expert = prepared.model.layers[1].mlp.experts[0]
    kind = "Int8Linear" if quantize else "GGUFLinear"
    assert type(expert.gate_up_proj).__name__ == type(expert.down_proj).__name__ == kind
    tokens = _tokens(1, 24, seed=8)
    with torch.no_grad():
        got, expected = prepared(tokens, _positions(0, 24)), exact(tokens, _positions(0, 24))
    assert _correlation(got, expected) > 0.999


def test_mxfp4_experts_as_stored(conversions, folder, tmp_path):
    """Real gpt-oss GGUFs keep the experts in MXFP4 (the converter writes it only from
    MXFP4 checkpoints): the F32 file's expert matrices requantized by gguf-py. fp32 equals
    transformers on gguf-py's dequantized weights; as stored (MXFP4 kernels, int8
    activations per 32) within their rounding."""
    path = _requantized(conversions["f32"].wait(), tmp_path / "mxfp4.gguf")
    assert read_gguf(path).tensors["blk.0.ffn_down_exps.weight"].ggml_type == "MXFP4"
    theirs = hf_model(folder)
    theirs.load_state_dict(_dequantized_experts(path), strict=False)
    exact = loader.load(path, dtype=torch.float32).model
    stored = loader.load(path, prepare=True).model
    assert type(stored.model.layers[0].mlp.experts[0].down_proj).__name__ == "GGUFLinear"
    tokens = _tokens(1, 24, seed=9)
    with torch.no_grad():
        expected = theirs(tokens, position_ids=_positions(0, 24)).logits
        torch.testing.assert_close(exact(tokens, _positions(0, 24)), expected, atol=1e-4, rtol=0)
        assert _correlation(stored(tokens, _positions(0, 24)), expected) > 0.999


def _requantized(source, path):
    """A copy of the GGUF `source` with every expert matrix in MXFP4 (gguf-py's quantizer)."""
    from gguf import GGUFReader

    reader = GGUFReader(source)
    kv = {}
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        kv[field.name] = field.contents()
    tensors = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.name.endswith("_exps.weight"):
            tensors[t.name] = (gguf.quants.quantize(data, gguf.GGMLQuantizationType.MXFP4),
                               "MXFP4")  # fmt: skip
        else:
            tensors[t.name] = (data, "F32")
    return write_gguf(path, "gpt-oss", kv=kv, tensors=tensors)


def _dequantized_experts(path) -> dict[str, torch.Tensor]:
    """transformers' fused expert tensors from the MXFP4 file, dequantized by gguf-py:
    gate_up_proj (E, C, 2F) with gate and up interleaved, down_proj (E, F, C)."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}

    def read(layer: int, kind: str) -> torch.Tensor:  # (E, rows, cols) as nn.Linear's
        t = tensors[f"blk.{layer}.ffn_{kind}_exps.weight"]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())

    out = {}
    for layer in range(CONFIG["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp.experts"
        gate, up = read(layer, "gate"), read(layer, "up")
        interleaved = torch.stack((gate, up), dim=2).flatten(1, 2)  # rows g0 u0 g1 u1...
        out[f"{prefix}.gate_up_proj"] = interleaved.transpose(1, 2)
        out[f"{prefix}.down_proj"] = read(layer, "down").transpose(1, 2)
    return out


def test_mxfp4_hf_folder(folder, tmp_path):
    """The hub's gpt-oss folders keep the experts in MXFP4 (`*_blocks` and `*_scales`,
    config.json's quantization_config mxfp4): random codes and scales in that layout load
    as transformers, dequantizing them itself, runs them."""
    state = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(11)
    for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, n_in, n_out = state.pop(key).shape
        shape = (experts, n_out, n_in // 32)
        state[f"{key}_blocks"] = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8,
                                               generator=generator)  # fmt: skip
        # weights up to 6 * 2^-3: gate and up still reach the clamp at times
        state[f"{key}_scales"] = torch.randint(121, 125, shape, dtype=torch.uint8,
                                               generator=generator)  # fmt: skip
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(state, tmp_path / "model.safetensors")
    theirs, ours = hf_model(tmp_path), loader.load(tmp_path).model
    assert "experts.gate_up_proj_blocks" not in str(dict(theirs.named_parameters()).keys())
    tokens = _tokens(2, 16, seed=12)
    for start in (0, 200):
        positions = _positions(start, 16, rows=2)
        with torch.no_grad():
            expected = theirs(tokens, position_ids=positions).logits
            torch.testing.assert_close(ours(tokens, positions), expected, atol=1e-4, rtol=0)


def test_bad_configs_are_refused_in_one_line(tmp_path):
    config = dict(model_type="gpt_oss", hidden_size=64, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, num_local_experts=4)  # fmt: skip
    for bad, match in [
        (dict(layer_types=["full_attention"]), "layer_types"),
        (dict(layer_types=["sliding_attention", "chunked_attention"]), "layer_types"),
        (dict(swiglu_limit=-1.0), "swiglu_limit"),
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    ]:
        with pytest.raises(PocketLMError, match=match) as error:
            check_config({**config, **bad}, source=tmp_path)
        assert "\n" not in str(error.value)


# openai/gpt-oss-20b's config.json as the hub has it (the older rope_scaling key, MXFP4
# experts), for what a user's folder says.
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
    "num_local_experts": 32, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn",
                            "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
                            "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn",
                     "truncate": False},
    "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "vocab_size": 201088,
}  # fmt: skip


def test_the_20b_config_reads_as_transformers_reads_it(tmp_path):
    """gpt-oss-20b's own config: every switch as HF's GptOssConfig has it, and the model it
    describes (built on the meta device) as large as transformers' (20.9B parameters)."""
    import transformers

    from pocketlm.weights.card import count_parameters

    config = check_config(GPT_OSS_20B, source=tmp_path)
    assert (config.n_experts, config.num_experts_per_tok, config.rope_theta) == (32, 4, 150000)
    assert config.layer_windows == [128, None] * 12 and config.swiglu_clamp == (1.702, 7.0)
    assert config.rope_scaling["rope_type"] == "yarn" and not config.rope_scaling["truncate"]
    hf_config = transformers.GptOssConfig(**{k: v for k, v in GPT_OSS_20B.items()
                                             if k != "quantization_config"})  # fmt: skip
    with torch.device("meta"):
        theirs = transformers.GptOssForCausalLM(hf_config)
    assert count_parameters(GPT_OSS_20B) == sum(p.numel() for p in theirs.parameters())
