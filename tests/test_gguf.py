"""GGUF reading against independent oracles.

- every block format against gguf-py's own `gguf.quants.dequantize`, bit for bit;
- the whole real SmolLM2 Q4_1 file against transformers' GGUF loader (config and tensors);
- GPT-2, Llama and Qwen2 files written here with `gguf.GGUFWriter` the way llama.cpp's
  converter writes them (GPT-2 Conv1D transposed, Llama q/k rows permuted), read back;
- Llama 3.1+ rope scaling as a `rope_freqs.weight` tensor, read into the config;
- malformed files and unsupported architectures end in one-line PocketLMErrors.

GGUF files made by llama.cpp's own converter are tested in test_gguf_convert.py.
"""

import re
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from checkpoints import write_gguf
from pocketlm.errors import CorruptModelError, ModelNotFoundError, PocketLMError
from pocketlm.models.rope import rope_attention_factor, rope_inv_freq
from pocketlm.weights.config import check_config
from pocketlm.weights.dequant import SUPPORTED_TYPES, dequantize, ggml_type_sizes
from pocketlm.weights.gguf import (
    GGUFCheckpoint,
    gguf_raw_tensors,
    gguf_state_dict,
    read_gguf,
)

# Byte offsets of the float16 scale fields in each K-quant block: random bytes there
# could be inf/NaN, which would make "equal" meaningless.
K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
                   "IQ4_NL": (0,), "IQ4_XS": (0,)}  # fmt: skip


def quantized(x: np.ndarray, type_name: str, rng: np.random.Generator) -> np.ndarray:
    """GGUF bytes for `x` in `type_name`: gguf's own quantizer, or random K-quant (and
    IQ4) blocks."""
    if type_name not in K_SCALE_OFFSETS:  # gguf-py can quantize these
        return gguf.quants.quantize(x, QT[type_name])
    block_size, type_size = ggml_type_sizes(type_name)
    blocks = rng.integers(0, 256, (*x.shape[:-1], x.shape[-1] // block_size, type_size), np.uint8)
    for at in K_SCALE_OFFSETS[type_name]:
        scale = (rng.standard_normal(blocks.shape[:-1]) * 0.01).astype(np.float16)
        blocks[..., at : at + 2] = scale.view(np.uint8).reshape(*blocks.shape[:-1], 2)
    return blocks.reshape(*x.shape[:-1], -1)


def reference(data: np.ndarray, type_name: str) -> np.ndarray:
    return gguf.quants.dequantize(data, QT[type_name]).astype(np.float32)


def one_line_error(exc_info: pytest.ExceptionInfo, path: Path) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and str(path) in message
    return message


# --- block formats --------------------------------------------------------------------


@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
def test_dequantize_matches_gguf(type_name):
    rng = np.random.default_rng(list(SUPPORTED_TYPES).index(type_name))
    x = rng.standard_normal((6, 512)).astype(np.float32)
    x[0] = 0.0  # an all-zero block row: d = 0
    x[1, :32] *= 1e4  # one block with large values
    data = quantized(x, type_name, rng)
    ours = dequantize(data.view(np.uint8), type_name, shape=(6, 512))
    assert ours.dtype == torch.float32
    np.testing.assert_array_equal(ours.numpy(), reference(data, type_name))


def test_dequantize_many_chunks_and_dtype():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((80, 32768)).astype(np.float32)  # 2.6M weights: three chunks
    data = gguf.quants.quantize(x, QT.Q4_1)
    ours = dequantize(data, "Q4_1", shape=x.shape, dtype=torch.bfloat16)
    want = torch.from_numpy(reference(data, "Q4_1")).to(torch.bfloat16)
    assert torch.equal(ours, want)


def test_unsupported_type_names_tensor_and_type():
    with pytest.raises(PocketLMError, match=r"blk\.0\.attn_q\.weight is stored as IQ2_XXS"):
        dequantize(
            np.zeros(66, np.uint8), "IQ2_XXS", shape=(256,), tensor_name="blk.0.attn_q.weight"
        )


def test_dequantize_rejects_wrong_byte_count():
    with pytest.raises(PocketLMError, match="do not hold shape"):
        dequantize(np.zeros(33, np.uint8), "Q8_0", shape=(32,), tensor_name="t")


# --- the real SmolLM2 file against transformers ------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> GGUFCheckpoint:
    return read_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_state(smollm2) -> dict[str, torch.Tensor]:
    return gguf_state_dict(smollm2)


@pytest.fixture(scope="module")
def transformers_smollm2(smollm2_gguf):
    """transformers' own GGUF loader on the same file: config, then dequantized tensors.

    This is what `from_pretrained(folder, gguf_file=...)` runs for Llama (its legacy GGUF
    path); it is called directly because from_pretrained also demands `accelerate`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(smollm2_gguf, return_tensors=True, model_to_load=model)
    return config, parsed["tensors"], set(model.state_dict())


def test_smollm2_header(smollm2, smollm2_gguf):
    assert smollm2.path == smollm2_gguf
    assert smollm2.architecture == "llama"
    assert smollm2.quantization == "Q4_1"
    meta = smollm2.metadata
    assert meta["general.architecture"] == "llama"
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert meta["tokenizer.ggml.merges"][0] == "Ġ t"
    assert meta["tokenizer.ggml.token_type"][:3] == [3, 3, 3]
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert "im_start" in meta["tokenizer.chat_template"]
    assert smollm2.tensors["token_embd.weight"].ggml_type == "Q8_0"
    assert smollm2.tensors["token_embd.weight"].shape == (49152, 576)


@pytest.mark.slow  # transformers parses and dequantizes the file twice
def test_smollm2_config_matches_transformers(smollm2, transformers_smollm2):
    config, _, _ = transformers_smollm2
    ours = smollm2.config
    for key in [
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "attention_bias",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ]:
        assert ours[key] == getattr(config, key), key
    assert ours["rope_theta"] == config.rope_parameters["rope_theta"] == 100000.0
    assert ours["rope_scaling"] is None and ours["sliding_window"] is None
    assert ours["torch_dtype"] == "float32"


@pytest.mark.slow
def test_smollm2_state_dict_matches_transformers(smollm2_state, transformers_smollm2):
    _, theirs, model_keys = transformers_smollm2
    ours = smollm2_state
    # Tied: no lm_head in the file; transformers' model has one, tied to the embedding.
    assert set(ours) == set(theirs) == model_keys - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.is_contiguous(), name
        # Same float32 arithmetic on the same bytes, and the same q/k un-permutation.
        assert torch.equal(tensor, theirs[name].float()), name


def test_smollm2_raw_tensors(smollm2, smollm2_state):
    raw = gguf_raw_tensors(smollm2)
    ours = smollm2_state
    assert set(raw) == set(ours)
    type_name, data, shape = raw["model.embed_tokens.weight"]
    assert (type_name, data.shape, shape) == ("Q8_0", (49152, 576 // 32 * 34), (49152, 576))
    assert isinstance(data, np.memmap) and not data.flags.writeable
    for name in ["model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight",
                 "model.layers.3.self_attn.k_proj.weight", "model.norm.weight"]:  # fmt: skip
        type_name, data, shape = raw[name]
        assert torch.equal(dequantize(data, type_name, shape=shape), ours[name]), name


# --- GPT-2 written like llama.cpp's converter --------------------------------------------

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_GGUF_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def gpt2_gguf_name(hf_name: str) -> str:
    fixed = {
        "transformer.wte.weight": "token_embd.weight",
        "transformer.wpe.weight": "position_embd.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    if hf_name.startswith("transformer.ln_f."):
        return "output_norm." + hf_name.rsplit(".", 1)[1]
    _, _, layer, rest = hf_name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{GPT2_GGUF_NAMES[module]}.{suffix}"


@pytest.fixture(scope="module")
def hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=48,
        vocab_size=96,
        bos_token_id=95,
        eos_token_id=95,
    )
    return GPT2LMHeadModel(config).eval()


def write_gpt2(path: Path, model, *, float_type: str, with_output: bool) -> Path:
    """As convert_hf_to_gguf.py's GPT2Model: Conv1D weights transposed to (out, in), 2-D
    weights in `float_type`, norms and biases F32, the attention mask buffers dropped."""
    cfg = model.config
    kv = {
        "gpt2.block_count": cfg.n_layer,
        "gpt2.context_length": cfg.n_positions,
        "gpt2.embedding_length": cfg.n_embd,
        "gpt2.feed_forward_length": 4 * cfg.n_embd,
        "gpt2.attention.head_count": cfg.n_head,
        "gpt2.attention.layer_norm_epsilon": cfg.layer_norm_epsilon,
        "general.file_type": 0 if float_type == "F32" else 1,
    }
    tensors = {}
    for name, tensor in model.transformer.state_dict().items():
        name = "transformer." + name
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        data = tensor.numpy()
        if name.endswith(CONV1D):
            data = np.ascontiguousarray(data.T)
        if data.ndim == 2 and float_type == "F16":
            data = data.astype(np.float16)
        tensors[gpt2_gguf_name(name)] = (data, "F16" if data.dtype == np.float16 else "F32")
    if with_output:
        tensors["output.weight"] = tensors["token_embd.weight"]
    return write_gguf(path, "gpt2", kv=kv, tensors=tensors)


@pytest.mark.parametrize(("float_type", "with_output"), [("F32", False), ("F16", True)])
def test_gpt2_round_trip(tmp_path, hf_gpt2, float_type, with_output):
    path = write_gpt2(
        tmp_path / "gpt2.gguf", hf_gpt2, float_type=float_type, with_output=with_output
    )
    ckpt = read_gguf(path)
    cfg, hf = ckpt.config, hf_gpt2.config
    assert ckpt.architecture == cfg["model_type"] == "gpt2"
    assert ckpt.quantization == float_type
    for key in ["n_embd", "n_layer", "n_head", "n_positions", "vocab_size"]:
        assert cfg[key] == getattr(hf, key), key
    assert cfg["n_ctx"] == hf.n_positions
    assert cfg["layer_norm_epsilon"] == pytest.approx(hf.layer_norm_epsilon)
    assert cfg["n_inner"] == 4 * hf.n_embd
    assert cfg["tie_word_embeddings"] is not with_output

    ours = gguf_state_dict(ckpt)
    want = {}
    for name, tensor in hf_gpt2.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if name.endswith(CONV1D):
            tensor = tensor.t()  # HF Conv1D is (in, out); ours is nn.Linear's (out, in)
        if tensor.ndim == 2 and float_type == "F16":
            tensor = tensor.half().float()
        want[name] = tensor
    if not with_output:
        del want["lm_head.weight"]
    assert set(ours) == set(want)
    for name in want:
        assert ours[name].shape == want[name].shape, name
        assert torch.equal(ours[name], want[name]), name
    assert ours["transformer.h.0.attn.c_attn.weight"].shape == (3 * 64, 64)
    assert ours["transformer.h.1.mlp.c_proj.weight"].shape == (64, 256)

    halves = gguf_state_dict(ckpt, dtype=torch.bfloat16)
    for name in want:
        assert halves[name].dtype == torch.bfloat16
        assert torch.equal(halves[name], want[name].to(torch.bfloat16)), name


# --- Llama and Qwen2 written like llama.cpp's converter ---------------------------------

LLAMA_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
# Every block format somewhere: (layer 0, layer 1) per projection.
LLAMA_TYPES = {
    "self_attn.q_proj": ("F32", "Q4_0"),
    "self_attn.k_proj": ("Q8_0", "Q5_1"),
    "self_attn.v_proj": ("Q4_K", "Q5_0"),
    "self_attn.o_proj": ("Q5_K", "BF16"),
    "mlp.gate_proj": ("Q2_K", "F16"),
    "mlp.up_proj": ("Q3_K", "Q4_1"),
    "mlp.down_proj": ("Q6_K", "Q4_K"),
}
H, KV, D, C, FFN, VOCAB = 4, 2, 64, 256, 512, 64


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim (numpy for torch)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {
        "model.embed_tokens.weight": (VOCAB, C),
        "model.norm.weight": (C,),
        "lm_head.weight": (VOCAB, C),
    }
    per_layer = {
        "self_attn.q_proj": (H * D, C),
        "self_attn.k_proj": (KV * D, C),
        "self_attn.v_proj": (KV * D, C),
        "self_attn.o_proj": (C, H * D),
        "mlp.gate_proj": (FFN, C),
        "mlp.up_proj": (FFN, C),
        "mlp.down_proj": (C, FFN),
        "input_layernorm": (C,),
        "post_attention_layernorm": (C,),
    }
    for i in range(2):
        shapes |= {f"model.layers.{i}.{m}.weight": s for m, s in per_layer.items()}
    return shapes


def stored_and_expected(w: np.ndarray, type_name: str, *, n_head: int | None, rng) -> tuple:
    """The GGUF data for HF-layout `w` (rows permuted over `n_head` heads, as llama.cpp
    does for q/k), and the HF-layout values a correct reader must give back."""
    stored = llama_cpp_permute(w, n_head) if n_head else w
    if type_name == "F32":
        return stored, w
    if type_name == "F16":
        return stored.astype(np.float16), w.astype(np.float16).astype(np.float32)
    if type_name in K_SCALE_OFFSETS:  # random blocks: gguf-py cannot quantize to K types
        assert n_head is None, "K-quant test data is never permuted"
        data = quantized(w, type_name, rng)
        return data, reference(data, type_name).reshape(w.shape)
    # Blocks run along rows and the permutation moves whole rows, so quantizing the
    # permuted rows and un-permuting equals quantizing the HF rows directly.
    return quantized(stored, type_name, rng), reference(quantized(w, type_name, rng), type_name)


def gguf_llama_name(name: str) -> tuple[str, int | None]:
    """Our name -> (llama.cpp name, layer index or None)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    if name in fixed:
        return fixed[name], None
    parts = name.split(".")
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{LLAMA_LAYER[module]}.{parts[-1]}", int(parts[2])


def write_llama_family(
    path: Path, arch: str, *, extra_kv: dict | None = None
) -> dict[str, torch.Tensor]:
    """Random HF-layout weights -> a GGUF as llama.cpp writes it; returns the expected state dict."""
    rng = np.random.default_rng(7)
    shapes = llama_shapes()
    if arch == "qwen2":  # q/k/v biases
        for i in range(2):
            shapes |= {
                f"model.layers.{i}.self_attn.{p}_proj.bias": (n * D,)
                for p, n in [("q", H), ("k", KV), ("v", KV)]
            }
    tensors, want = {}, {}
    for name, shape in shapes.items():
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        gguf_name, layer = gguf_llama_name(name)
        module = ".".join(name.split(".")[3:-1])
        if name == "model.embed_tokens.weight":
            type_name = "Q8_0"
        elif name == "lm_head.weight":
            type_name = "Q6_K"
        else:
            type_name = LLAMA_TYPES[module][layer] if w.ndim == 2 else "F32"
        n_head = None
        if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
            n_head = H if module == "self_attn.q_proj" else KV
        data, expect = stored_and_expected(w, type_name, n_head=n_head, rng=rng)
        tensors[gguf_name] = (data, type_name)
        want[name] = torch.from_numpy(np.ascontiguousarray(expect))
    kv = {
        f"{arch}.block_count": 2,
        f"{arch}.context_length": 4096,
        f"{arch}.embedding_length": C,
        f"{arch}.feed_forward_length": FFN,
        f"{arch}.attention.head_count": H,
        f"{arch}.attention.head_count_kv": KV,
        f"{arch}.rope.freq_base": 500000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.rope.dimension_count": D,
        "general.file_type": 15,  # MOSTLY_Q4_K_M
        **(extra_kv or {}),
    }
    write_gguf(path, arch, kv=kv, tensors=tensors)
    return want


def assert_state_dicts_equal(ours: dict, want: dict) -> None:
    assert set(ours) == set(want)
    for name in want:
        assert ours[name].shape == want[name].shape, name
        assert torch.equal(ours[name], want[name]), name


def test_llama_every_block_format_and_qk_unpermute(tmp_path):
    path = tmp_path / "llama.gguf"
    want = write_llama_family(path, "llama")
    ckpt = read_gguf(path)
    assert ckpt.quantization == "Q4_K_M"
    cfg = ckpt.config
    assert cfg["model_type"] == "llama"
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (H, KV, D)
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (C, FFN, 2)
    assert cfg["rope_theta"] == 500000.0 and cfg["max_position_embeddings"] == 4096
    assert cfg["rms_norm_eps"] == pytest.approx(1e-6)
    assert cfg["tie_word_embeddings"] is False and cfg["attention_bias"] is False
    assert cfg["vocab_size"] == VOCAB
    assert_state_dicts_equal(gguf_state_dict(ckpt), want)

    raw = gguf_raw_tensors(ckpt)
    for name in want:  # undecoded blocks, q/k rows un-permuted too
        type_name, data, shape = raw[name]
        assert torch.equal(dequantize(data, type_name, shape=shape), want[name]), name


def test_qwen2_biases_not_permuted_and_rope_scaling(tmp_path):
    path = tmp_path / "qwen2.gguf"
    extra = {
        "qwen2.rope.scaling.type": "yarn",
        "qwen2.rope.scaling.factor": 4.0,
        "qwen2.rope.scaling.original_context_length": 32768,
        "qwen2.attention.sliding_window": 2048,
        "tokenizer.ggml.eos_token_id": 5,
    }
    want = write_llama_family(path, "qwen2", extra_kv=extra)
    ckpt = read_gguf(path)
    cfg = ckpt.config
    assert cfg["model_type"] == "qwen2" and cfg["attention_bias"] is True
    assert cfg["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }
    assert cfg["sliding_window"] == 2048 and cfg["eos_token_id"] == 5
    assert_state_dicts_equal(gguf_state_dict(ckpt), want)
    # YaRN runs (tests/test_phi3.py checks it against transformers): the slowest
    # frequencies divided by the factor 4, the fastest kept, cos/sin scaled up a little.
    model_config = check_config(cfg, source=path)
    d = model_config.head_dim
    plain = 1.0 / (model_config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaled = rope_inv_freq(model_config).double()
    assert torch.allclose(scaled[0], plain[0]) and torch.allclose(scaled[-1], plain[-1] / 4)
    assert bool((scaled <= plain * (1 + 1e-6)).all()) and rope_attention_factor(model_config) > 1


# --- bad input --------------------------------------------------------------------------


@pytest.fixture
def small_gguf(tmp_path, hf_gpt2) -> Path:
    return write_gpt2(tmp_path / "small.gguf", hf_gpt2, float_type="F16", with_output=False)


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        read_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("cut", [0, 3, 20, 100, 2000, -1])
def test_truncated_file(tmp_path, small_gguf, cut):
    data = small_gguf.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: cut if cut >= 0 else len(data) - 1])
    with pytest.raises(CorruptModelError) as e:
        read_gguf(bad)
    one_line_error(e, bad)


def test_garbage_and_wrong_magic(tmp_path, small_gguf):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    with pytest.raises(CorruptModelError, match="not a valid GGUF") as e:
        read_gguf(garbage)
    one_line_error(e, garbage)
    magic = tmp_path / "magic.gguf"
    magic.write_bytes(b"GGML" + small_gguf.read_bytes()[4:])
    with pytest.raises(CorruptModelError, match="starts with b'GGML'") as e:
        read_gguf(magic)
    one_line_error(e, magic)


def test_big_endian_and_unknown_version(tmp_path, small_gguf):
    data = bytearray(small_gguf.read_bytes())
    data[4:8] = (3).to_bytes(4, "big")
    (tmp_path / "be.gguf").write_bytes(data)
    with pytest.raises(CorruptModelError, match="big-endian"):
        read_gguf(tmp_path / "be.gguf")
    data[4:8] = (1).to_bytes(4, "little")
    (tmp_path / "v1.gguf").write_bytes(data)
    with pytest.raises(CorruptModelError, match="version 1"):
        read_gguf(tmp_path / "v1.gguf")


@pytest.mark.parametrize("arch", ["mamba", "bloom"])
def test_unsupported_architecture(tmp_path, arch):
    tensors = {"token_embd.weight": (np.zeros((8, 32), np.float32), "F32")}
    path = write_gguf(
        tmp_path / f"{arch}.gguf", arch, kv={f"{arch}.block_count": 1}, tensors=tensors
    )
    with pytest.raises(PocketLMError) as e:
        read_gguf(path)
    message = one_line_error(e, path)
    assert f"'{arch}'" in message and "gpt2, llama, qwen2" in message


def test_missing_and_misshapen_tensors(tmp_path, hf_gpt2):
    path = write_gpt2(tmp_path / "ok.gguf", hf_gpt2, float_type="F32", with_output=False)
    ckpt = read_gguf(path)
    # Drop a tensor from the table as a damaged converter might: the key-set check names it.
    del ckpt.tensors["blk.1.ffn_down.weight"]
    with pytest.raises(CorruptModelError, match=r"'blk\.1\.ffn_down\.weight' is missing") as e:
        gguf_state_dict(ckpt)
    one_line_error(e, path)
    ckpt = read_gguf(path)
    info = ckpt.tensors["blk.0.attn_qkv.weight"]
    ckpt.tensors["blk.0.attn_qkv.weight"] = type(info)(
        info.name, info.ggml_type, (64, 192), info.offset, info.n_bytes
    )
    with pytest.raises(
        CorruptModelError, match=r"attn_qkv\.weight' has shape \(64, 192\), expected \(192, 64\)"
    ):
        gguf_state_dict(ckpt)


# The metadata of a small Llama; each case below leaves out or spoils one key.
LLAMA_META = {
    "llama.block_count": 1,
    "llama.context_length": 128,
    "llama.embedding_length": 64,
    "llama.feed_forward_length": 128,
    "llama.attention.head_count": 4,
    "llama.attention.layer_norm_rms_epsilon": 1e-5,
}


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"llama.block_count": None}, "config llama.block_count is missing (expected an integer"),
        ({"llama.attention.layer_norm_rms_epsilon": None},
         "config llama.attention.layer_norm_rms_epsilon is missing (expected a number"),
        ({"llama.block_count": 5000}, "config llama.block_count = 5000 is not valid (expected an"),
        ({"llama.attention.head_count_kv": 3},
         "config llama.attention.head_count_kv = 3 is not valid (expected a divisor of"),
        ({"llama.context_length": "long"}, "config llama.context_length = 'long' is not valid"),
        ({"llama.rope.scale_linear": -2.0}, "config rope_scaling.factor = -2.0 is not valid"),
    ],
    ids=["no-block-count", "no-epsilon", "too-many-blocks", "kv-heads", "string", "rope"],
)  # fmt: skip
def test_metadata_goes_through_the_config_validator(tmp_path, change, error):
    """GGUF metadata and config.json share one validator; its messages name the GGUF key."""
    kv = {k: v for k, v in (LLAMA_META | change).items() if v is not None}
    tensors = {"token_embd.weight": (np.zeros((8, 64), np.float32), "F32")}
    path = write_gguf(tmp_path / "bad.gguf", "llama", kv=kv, tensors=tensors)
    with pytest.raises(CorruptModelError, match=re.escape(error)) as e:
        read_gguf(path)
    assert one_line_error(e, path).endswith("re-download or re-convert the model")


def test_unknown_tensor_and_layer_out_of_range(tmp_path):
    path = tmp_path / "llama.gguf"
    write_llama_family(path, "llama", extra_kv={"llama.block_count": 1})
    with pytest.raises(
        CorruptModelError, match=r"'blk\.1\..*' is not part of a 1-layer llama model"
    ):
        gguf_state_dict(read_gguf(path))


# --- Llama 3.1+ rope scaling: rope_freqs.weight ---------------------------------------------


def rope_freqs_gguf(path: Path, factors, *, arch: str = "llama", kv: dict | None = None) -> Path:
    """A small Llama's metadata with a rope_freqs.weight tensor (head_dim 16: 8 pairs)."""
    meta = {k.replace("llama.", f"{arch}.", 1): v for k, v in (LLAMA_META | (kv or {})).items()}
    tensors = {"token_embd.weight": (np.zeros((8, 64), np.float32), "F32"),
               "rope_freqs.weight": (np.asarray(factors, np.float32), "F32")}  # fmt: skip
    return write_gguf(path, arch, kv=meta, tensors=tensors)


def test_rope_freqs_divide_the_rotary_frequencies(tmp_path):
    factors = [1.0, 1.0, 1.5, 2.5, 4.0, 8.0, 8.0, 8.0]
    path = rope_freqs_gguf(tmp_path / "llama31.gguf", factors)
    ckpt = read_gguf(path)
    assert ckpt.config["rope_scaling"] == {"rope_type": "freq_factors", "factors": factors}
    default = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    want = (default / torch.tensor(factors, dtype=torch.float64)).float()
    assert torch.equal(rope_inv_freq(check_config(ckpt.config, source=path)), want)


@pytest.mark.parametrize(
    ("factors", "error"),
    [
        ([1.0] * 4, "config rope_freqs.weight.factors = [1.0, 1.0, 1.0, 1.0] is not valid "
                    "(expected 8 numbers, one per pair of the 16 rotated head dimensions)"),
        ([1.0] * 7 + [0.0], "config rope_freqs.weight.factors = 0.0 is not valid (expected a "
                            "number above 0"),
        ([1.0] * 7 + [float("nan")], "config rope_freqs.weight.factors = nan is not valid"),
        ([[1.0] * 4] * 2, "tensor 'rope_freqs.weight' has shape (2, 4), not one per pair"),
        ([1.0] * 40000, "tensor 'rope_freqs.weight' has shape (40000,), not one per pair"),
    ],
    ids=["count", "zero", "nan", "matrix", "huge"],
)  # fmt: skip
def test_bad_rope_freqs_are_refused(tmp_path, factors, error):
    path = rope_freqs_gguf(tmp_path / "bad.gguf", factors)
    with pytest.raises(CorruptModelError, match=re.escape(error)) as e:
        read_gguf(path)
    one_line_error(e, path)


@pytest.mark.parametrize(
    ("arch", "kv", "error"),
    [
        ("llama", {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0},
         "scales RoPE twice (rope_freqs.weight, and 'linear' scaling in its metadata)"),
        ("llama", {"llama.attention.value_length": 32},
         "has value heads of 32 dimensions and key heads of 16"),
        # llama.cpp reads rope_freqs for Llama only; a Qwen2 file with one is not standard.
        ("qwen2", {}, "'rope_freqs.weight' is not part of a 1-layer qwen2 model"),
    ],
    ids=["twice", "value-length", "qwen2"],
)  # fmt: skip
def test_what_pocketlm_cannot_run_is_refused(tmp_path, arch, kv, error):
    path = rope_freqs_gguf(tmp_path / "bad.gguf", [1.0] * 8, arch=arch, kv=kv)
    with pytest.raises(PocketLMError, match=re.escape(error)) as e:
        gguf_state_dict(read_gguf(path))
    one_line_error(e, path)


def test_file_changed_after_reading_header(tmp_path, small_gguf):
    ckpt = read_gguf(small_gguf)
    small_gguf.write_bytes(small_gguf.read_bytes()[:-64])
    with pytest.raises(CorruptModelError, match="changed size"):
        gguf_state_dict(ckpt)


def sparse_gguf(path: Path, body: bytes, *, size: int = 1 << 34) -> Path:
    """A GGUF header `body` followed by a hole: a 16 GB file that takes no disk."""
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<I", 3) + body)
        f.truncate(size)
    return path


@pytest.mark.parametrize(
    ("body", "error"),
    [
        # one key "k" = u8 array of 2^33 elements: would be a 64 GB Python list
        (struct.pack("<QQQ1sIIQ", 0, 1, 1, b"k", 9, 0, 1 << 33), "elements, more than pocketlm"),
        # 2^30 strings, each 8 zero bytes long in the hole: empty strings, one by one
        (struct.pack("<QQQ1sIIQ", 0, 1, 1, b"k", 9, 8, 1 << 30), "elements, more than pocketlm"),
        # a string of 2^33 NUL bytes, which is valid UTF-8
        (struct.pack("<QQQ1sIQ", 0, 1, 1, b"k", 8, 1 << 33), "bytes long, more than"),
        # 2^28 tensors of zero bytes
        (struct.pack("<QQ", 1 << 28, 0), "tensors, too many"),
    ],
    ids=["u8-array", "string-array", "string", "tensor-count"],
)
def test_huge_counts_in_a_huge_file_are_refused_before_reading(tmp_path, body, error):
    path = sparse_gguf(tmp_path / "huge.gguf", body)
    with pytest.raises(CorruptModelError, match=error) as e:
        read_gguf(path)
    one_line_error(e, path)
