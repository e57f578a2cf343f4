"""Mixtures of experts natively (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE):
the Llama block with models/moe.py's SparseMoE, against `transformers`' own classes on the
same random weights, from the HF folder (per-expert keys, as transformers saves them, and
the fused 3-D form its modules hold) and from the GGUF llama.cpp's `convert_hf_to_gguf.py`
makes of it (tests/convert.py). 6 heads of 16 over 3 KV heads beside hidden 64, 6-8
experts, top 2; dense layers among sparse ones through mlp_only_layers and
decoder_sparse_step (HF only: llama.cpp's converter has no names for them)."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import family_checks as check
from checkpoints import hf_model, make_llama
from convert import Conversion, make_convertible
from pocketlm.errors import PocketLMError
from pocketlm.models import make_cache
from pocketlm.models.moe import SparseMoE
from pocketlm.serve.scheduler import Scheduler
from pocketlm.weights import loader
from pocketlm.weights.config import check_config
from pocketlm.weights.gguf import read_gguf

SHAPE = dict(num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3, head_dim=16,
             intermediate_size=96)  # fmt: skip
CASES = {
    "mixtral": dict(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=6, num_experts_per_tok=2,
                      moe_intermediate_size=64, shared_expert_intermediate_size=96),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=64, norm_topk_prob=True),
    # Dense layers among the sparse ones (HF folders only, GPT-2's vocabulary: llama.cpp's
    # converter has no names for a Qwen MoE's dense layers).
    "qwen2_moe-dense": dict(model_type="qwen2_moe", num_experts=6, num_experts_per_tok=3,
                            moe_intermediate_size=64, shared_expert_intermediate_size=96,
                            mlp_only_layers=[1], norm_topk_prob=True),
    "qwen3_moe-dense": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=64, decoder_sparse_step=2),
}  # fmt: skip
SPARSE = {"mixtral": [0, 1, 2], "qwen2_moe": [0, 1, 2], "qwen3_moe": [0, 1, 2],
          "qwen2_moe-dense": [0, 2], "qwen3_moe-dense": [1]}  # fmt: skip
# The float conversions are compared with transformers on the file's own weights; each
# family's experts are read from 3-D tensors, Mixtral's also as stored in Q8_0.
GGUF_CASES = {"mixtral-q8_0": ("mixtral", "q8_0"), "qwen2_moe-f32": ("qwen2_moe", "f32"),
              "qwen3_moe-f16": ("qwen3_moe", "f16")}  # fmt: skip
PROMPTS = {"mixtral": [15496, 995, 11, 703, 389, 345], "qwen": [9707, 1879, 11, 1128, 525, 498]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    made = {}
    for name, config in CASES.items():
        folder = tmp_path_factory.mktemp(name)
        make = make_llama if name.endswith("dense") else make_convertible
        made[name] = make(folder, **SHAPE, **config)
        # Router weights 10x larger, so routing is decided by clear margins (tiny random
        # ones leave near ties that rounding may flip), as a trained router's are.
        check.randomize_norms(
            folder, rms=True, scale=(("mlp.gate.weight", "shared_expert_gate.weight"), 10)
        )
    return made


@pytest.fixture(scope="module")
def conversions(folders) -> dict[str, Conversion]:
    """Every GGUF case's conversion started at once (they overlap)."""
    return check.start_conversions(folders, GGUF_CASES)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, folders, conversions):
    """(name, ours, transformers') from each case's folder; the conversions run meanwhile."""
    return request.param, *check.load_pair(folders[request.param])


def _prompt(name: str) -> list[int]:
    return PROMPTS["qwen" if name in ("qwen2_moe", "qwen3_moe") else "mixtral"]


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.ravel(), b.ravel()]))[0, 1].item()


def test_sparse_layers_experts_and_shared_expert(case, folders):
    """The layers the config makes sparse are SparseMoE, the others Llama's MLP; the
    checkpoint as transformers saves it has one tensor per expert and projection."""
    name, ours, _ = case
    layers = ours.model.layers
    assert [i for i, b in enumerate(layers) if isinstance(b.mlp, SparseMoE)] == SPARSE[name]
    moe = layers[SPARSE[name][0]].mlp
    assert len(moe.experts) == CASES[name].get("num_experts", CASES[name].get("num_local_experts"))
    assert (moe.shared_expert is not None) == ("shared_expert_intermediate_size" in CASES[name])
    assert moe.renormalize == (name == "mixtral" or CASES[name].get("norm_topk_prob", False))
    with safe_open(folders[name] / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    expert = "block_sparse_moe.experts.1.w3" if name == "mixtral" else "mlp.experts.1.up_proj"
    assert f"model.layers.{SPARSE[name][0]}.{expert}.weight" in keys
    assert ours.model.layers[0].self_attn.qk_norm == name.startswith("qwen3")


def test_logits_match_transformers_at_several_positions(case):
    _, ours, theirs = case
    tokens = check.tokens(2, 16, seed=1)
    for start in (0, 17, 200):
        positions = check.positions(start, 16, rows=2)
        with torch.no_grad():
            expected = theirs(tokens, position_ids=positions).logits
            got = ours(tokens, positions)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_prefill_then_decode_through_cache_matches(case):
    _, ours, theirs = case
    tokens = check.tokens(1, 30, seed=2)
    with torch.no_grad():
        expected = theirs(tokens).logits
        cache = make_cache(ours, batch_size=1, max_seq_len=64)
        prefill = ours(tokens[:, :20], check.positions(0, 20), cache)
        steps = [ours(tokens[:, i : i + 1], check.positions(i, 1), cache) for i in range(20, 30)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), expected, atol=1e-4, rtol=0)


def test_greedy_ids_match_transformers_generate(case):
    name, ours, theirs = case
    assert check.greedy(ours, _prompt(name), 16) == check.hf_greedy(theirs, _prompt(name), 16)


def test_a_decode_step_runs_only_the_chosen_experts(folders):
    """One token, one step: in each sparse layer exactly top-k experts run, each once."""
    model = loader.load(folders["qwen2_moe"]).model
    calls: list[int] = []
    for block in model.model.layers:
        for e, expert in enumerate(block.mlp.experts):
            expert.register_forward_hook(lambda m, args, out, e=e: calls.append(args[0].shape[0]))
    cache = make_cache(model, batch_size=1, max_seq_len=16)
    with torch.no_grad():
        model(check.tokens(1, 5, seed=3), check.positions(0, 5), cache)
        calls.clear()
        model(check.tokens(1, 1, seed=4), check.positions(5, 1), cache)
    assert calls == [1] * (2 * 3)  # top 2 of 6, in each of 3 layers, one row each


def test_fused_3d_expert_tensors_load_too(folders, tmp_path):
    """transformers' modules hold each layer's experts as gate_up_proj (E, 2F, C) and
    down_proj (E, C, F); a checkpoint saved from that state dict loads the same."""
    folder = folders["qwen3_moe"]
    theirs = hf_model(folder)
    state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file(state, tmp_path / "model.safetensors")
    ours = loader.load(tmp_path).model
    tokens = check.tokens(1, 20, seed=5)
    with torch.no_grad():
        expected = theirs(tokens, position_ids=check.positions(0, 20)).logits
        torch.testing.assert_close(
            ours(tokens, check.positions(0, 20)), expected, atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_prepared_fused_and_quantized(folders, quantize):
    """Each expert's gate/up fused; int8 and int4 quantize the experts (the router stays
    float): fp32 exact, int8 and int4 within their rounding."""
    folder = folders["qwen2_moe-dense"]
    reference = loader.load(folder).model
    prepared = loader.load(folder, prepare=True, quantize=quantize).model
    moe = prepared.model.layers[0].mlp
    assert moe.experts[0].gate_up_proj is not None and moe.shared_expert.gate_up_proj is not None
    assert prepared.model.layers[1].mlp.gate_up_proj is not None  # the dense layer's
    assert type(moe.gate.weight) is torch.nn.Parameter and moe.gate.weight.dtype == torch.float32
    tokens = check.tokens(1, 24, seed=6)
    with torch.no_grad():
        expected, got = (
            reference(tokens, check.positions(0, 24)),
            prepared(tokens, check.positions(0, 24)),
        )
    if quantize is None:
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        prompt = PROMPTS["mixtral"]
        assert check.greedy(prepared, prompt, 16) == check.greedy(reference, prompt, 16)
    else:
        assert _correlation(got, expected) > {"int8": 0.999, "int4": 0.98}[quantize]


def test_batched_scheduler_equals_each_request_alone(folders):
    """Rows of several requests in one batch route token by token as each alone does."""
    model = loader.load(folders["mixtral"], prepare=True).model
    lm = loader.load(folders["mixtral"])
    prompts = [[464, 3290], [15496, 995, 11], [40, 588, 257, 1310, 286], [818]]
    alone = [check.greedy(model, ids, 10) for ids in prompts]
    scheduler = Scheduler(model, lm.tokenizer, max_batch=4, max_queue=8)
    scheduler.start()
    try:
        runs = [check.Run(ids) for ids in prompts]
        scheduler.submit([r.request for r in runs])
        assert [r.wait(30) for r in runs] == alone
    finally:
        scheduler.stop()


@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_converted_gguf_matches_transformers(name, conversions, folders):
    """Each expert's matrices come out of the 3-D tensors in their place (equal to the
    folder's, up to the file's rounding), and run as transformers runs them."""
    case_name, outtype = GGUF_CASES[name]
    gguf_file, folder = conversions[name].wait(), folders[case_name]
    ckpt = read_gguf(gguf_file)
    assert ckpt.architecture == {"mixtral": "llama"}.get(case_name, case_name.replace("_", ""))
    config = check_config(ckpt.config, source=gguf_file)
    assert (
        config.model_type == case_name
        and config.n_experts == ckpt.tensors["blk.2.ffn_up_exps.weight"].shape[0]
    )
    assert not config.mlp_only_layers and config.norm_topk_prob == (case_name != "qwen2_moe")
    ours = loader.load(gguf_file, dtype=torch.float32).model
    reference = dict(loader.load(folder).model.state_dict())  # the folder's, as tested above
    got = dict(ours.state_dict())
    assert got.keys() == reference.keys()
    tolerance = {"f32": 0.0, "f16": 1e-3, "q8_0": 1e-2}[outtype]  # relative to each's max
    for key, tensor in got.items():
        error = (tensor - reference[key]).abs().max() / reference[key].abs().max().clamp(min=1e-6)
        assert error <= tolerance, key
    theirs = hf_model(folder)  # on the file's own (rounded) weights
    theirs.load_state_dict(_hf_state(ours, theirs), strict=True)
    tokens = check.tokens(2, 16, seed=7)
    for start in (0, 200):
        positions = check.positions(start, 16, rows=2)
        with torch.no_grad():
            expected = theirs(tokens, position_ids=positions).logits
            logits = ours(tokens, positions)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert check.greedy(ours, _prompt(case_name), 16) == check.hf_greedy(
        theirs, _prompt(case_name), 16
    )


def _hf_state(ours, theirs) -> dict[str, torch.Tensor]:
    """Our model's weights under transformers' names: per-expert matrices stacked into
    its 3-D gate_up_proj and down_proj."""
    state = dict(ours.state_dict())
    for key in [k for k in theirs.state_dict() if k.endswith("mlp.experts.gate_up_proj")]:
        prefix = key.removesuffix(".gate_up_proj")
        n = len(ours.get_submodule(prefix))
        state[key] = torch.stack(
            [torch.cat([state.pop(f"{prefix}.{e}.{p}_proj.weight") for p in ("gate", "up")])
             for e in range(n)]
        )  # fmt: skip
        state[f"{prefix}.down_proj"] = torch.stack(
            [state.pop(f"{prefix}.{e}.down_proj.weight") for e in range(n)]
        )
    return state


@pytest.mark.parametrize(("name", "quantize"), [("qwen3_moe-f16", None), ("mixtral-q8_0", None),
                                                 ("mixtral-q8_0", "int8")])  # fmt: skip
def test_converted_gguf_runs_as_stored_and_quantized(conversions, name, quantize):
    """The default load (each expert's matrix kept as stored: a slice of the 3-D tensor's
    bytes; fused and prepared) and Q8_0 straight into int8 agree with the same file
    dequantized to fp32: F16 within 1e-4, Q8_0 within the int8 rounding of its
    activations (random weights have near ties, so no ids)."""
    gguf_file = conversions[name].wait()
    prepared = loader.load(gguf_file, prepare=True, quantize=quantize).model
    exact = loader.load(gguf_file, dtype=torch.float32).model
    expert = prepared.model.layers[1].mlp.experts[0]
    kind = "Int8Linear" if quantize else "GGUFLinear"
    assert type(expert.gate_up_proj).__name__ == type(expert.down_proj).__name__ == kind
    tokens = check.tokens(1, 24, seed=8)
    with torch.no_grad():
        got, expected = (
            prepared(tokens, check.positions(0, 24)),
            exact(tokens, check.positions(0, 24)),
        )
    if name.endswith("f16"):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert check.greedy(prepared, PROMPTS["qwen"], 8) == check.greedy(exact, PROMPTS["qwen"], 8)
    else:
        assert _correlation(got, expected) > 0.999


def test_bad_expert_configs_are_refused_in_one_line(tmp_path):
    config = dict(model_type="mixtral", hidden_size=64, num_attention_heads=4,
                  num_hidden_layers=2, num_local_experts=4)  # fmt: skip
    for bad, match in [
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(model_type="qwen3_moe", num_experts=4, mlp_only_layers=[2]), "mlp_only_layers"),
        (dict(num_local_experts=-1), "num_local_experts"),
    ]:
        with pytest.raises(PocketLMError, match=match) as error:
            check_config({**config, **bad}, source=tmp_path)
        assert "\n" not in str(error.value)
