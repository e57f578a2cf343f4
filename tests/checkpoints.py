"""Checkpoints the tests make themselves: `transformers` models with random weights in
Hugging Face layout (save_pretrained), plus the shipped GPT-2 vocabulary beside them; and
GGUF files written with `gguf`'s own writer."""

import shutil
from importlib import resources
from pathlib import Path

import gguf
import numpy as np
import torch


def gpt2_vocab_files(folder: Path) -> Path:
    data = resources.files("pocketlm") / "data" / "gpt2"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        with resources.as_file(data / name) as src:
            shutil.copy(src, folder / name)
    return folder


def make_gpt2(folder: Path, *, seed: int = 0, with_tokenizer: bool = True, **config) -> Path:
    """A random GPT-2 in HF layout; `config` overrides GPT2Config fields."""
    from transformers import GPT2Config, GPT2LMHeadModel

    defaults = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=50257)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**{**defaults, **config})).eval()
    model.save_pretrained(folder)
    if with_tokenizer:
        gpt2_vocab_files(folder)
    return folder


def make_llama(folder: Path, *, model_type: str = "llama", seed: int = 0, **config) -> Path:
    """A random Llama / Mistral / Qwen2 / Qwen3 / Gemma 1-3 / Phi-3 / SmolLM3 / OLMo 2 /
    Granite (or Mixtral / Qwen2-MoE / Qwen3-MoE / GPT-OSS) in HF layout, with the GPT-2 vocabulary as
    its tokenizer (the architecture tests only need some valid tokenizer)."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "smollm3": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM),
        "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM),
        "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM),
        "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM),
    }
    config_cls, model_cls = classes[model_type]
    defaults = dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        vocab_size=50257,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**defaults, **config})).eval()
    model.save_pretrained(folder)
    gpt2_vocab_files(folder)
    return folder


# The LayerNorm families (GPT-NeoX, Falcon, StableLM, Starcoder2) by transformers' own
# classes: small sizes, each config's keys as its family names them.
FAMILIES = ("gpt_neox", "falcon", "stablelm", "starcoder2")


def make_family(folder: Path, *, model_type: str, seed: int = 0, **config) -> Path:
    """A random GPT-NeoX / Falcon / StableLM / Starcoder2 in HF layout (`config` overrides
    the transformers config's fields), with the GPT-2 vocabulary as its tokenizer."""
    import transformers

    defaults = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256, vocab_size=50257, bos_token_id=50256,
                    eos_token_id=50256)  # fmt: skip
    torch.manual_seed(seed)
    hf_config = transformers.AutoConfig.for_model(model_type, **{**defaults, **config})
    transformers.AutoModelForCausalLM.from_config(hf_config).eval().save_pretrained(folder)
    gpt2_vocab_files(folder)
    return folder


def make_gptj(folder: Path, *, seed: int = 0) -> Path:
    """A random GPT-J in HF layout with the GPT-2 vocabulary: an architecture pocketlm has
    no module for, so it runs through the transformers fallback."""
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(seed)
    config = GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=50257,
                        bos_token_id=50256, eos_token_id=50256, n_positions=128)  # fmt: skip
    GPTJForCausalLM(config).eval().save_pretrained(folder)
    return gpt2_vocab_files(folder)


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def write_gguf(
    path: Path, arch: str, *, kv: dict, tensors: dict[str, tuple[np.ndarray, str]]
) -> Path:
    """A GGUF file with `kv` metadata (ints as uint32) and `tensors` = name -> (data, type)."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, (data, type_name) in tensors.items():
        raw_dtype = None if type_name in ("F32", "F16") else gguf.GGMLQuantizationType[type_name]
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
