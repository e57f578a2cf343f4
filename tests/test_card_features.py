"""`pocketlm show` names a model's family and the features its config switches on, read from
config keys alone (so families without a native module are described too).

Configs are transformers' own config classes with each model's published hyper-parameters
(`to_dict()`: the keys transformers writes), and hub-style config.json dicts (older keys:
`rope_scaling`, `num_experts`, `sliding_window_pattern`, no `layer_types`). The oracle for the
second kind is the first: transformers normalising the same dict must not change the words.
"""

import pytest
import transformers

from checkpoints import make_llama
from pocketlm.cli.main import main
from pocketlm.weights.card import describe, family, features

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip

# (config class, published hyper-parameters, family, features)
CASES = {
    "llama-3.2-1b": (
        "LlamaConfig",
        dict(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_ROPE,
            tie_word_embeddings=True,
        ),  # fmt: skip
        "Llama",
        [
            "grouped-query attention (8 kv heads)",
            "RoPE (theta 500000), llama3 scaling x32",
            "tied embeddings",
        ],  # fmt: skip
    ),
    "qwen3-0.6b": (
        "Qwen3Config",
        dict(
            hidden_size=1024,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
        ),  # fmt: skip
        "Qwen3",
        [
            "grouped-query attention (8 kv heads)",
            "RoPE (theta 1000000)",
            "head dim 128",
            "q/k norm",
            "tied embeddings",
        ],  # fmt: skip
    ),
    "gemma-2-2b": (
        "Gemma2Config",
        dict(
            hidden_size=2304,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            sliding_window=4096,
        ),  # fmt: skip
        "Gemma 2",
        [
            "grouped-query attention (4 kv heads)",
            "sliding window 4096 on alternating layers",
            "RoPE (theta 10000)",
            "head dim 256",
            "norms before and after each sublayer",
            "embeddings scaled by sqrt(width)",
            "tied embeddings",
            "soft-capping 50/30",
        ],  # fmt: skip
    ),
    "gemma-3-1b": (
        "Gemma3TextConfig",
        dict(
            hidden_size=1152,
            num_hidden_layers=26,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=512,
        ),  # fmt: skip
        "Gemma 3",
        [
            "multi-query attention (1 kv head)",
            "sliding window 512 on 5 of every 6 layers",
            "RoPE (theta 1000000, 10000 on sliding layers)",
            "head dim 256",
            "q/k norm",
            "norms before and after each sublayer",
            "embeddings scaled by sqrt(width)",
            "tied embeddings",
        ],  # fmt: skip
    ),
    "mixtral-8x7b": (
        "MixtralConfig",
        dict(num_local_experts=8, num_experts_per_tok=2, rope_theta=1000000.0),
        "Mixtral (Mistral MoE)",
        ["grouped-query attention (8 kv heads)", "RoPE (theta 1000000)", "8 experts, top-2"],
    ),
    "qwen3-30b-a3b": (
        "Qwen3MoeConfig",
        dict(
            hidden_size=2048,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
        ),  # fmt: skip
        "Qwen3-MoE",
        [
            "grouped-query attention (4 kv heads)",
            "RoPE (theta 10000)",
            "head dim 128",
            "q/k norm",
            "128 experts, top-8",
        ],  # fmt: skip
    ),
    "gpt-oss-20b": (
        "GptOssConfig",
        dict(num_hidden_layers=24, num_local_experts=32),
        "GPT-OSS",
        [
            "grouped-query attention (8 kv heads)",
            "sliding window 128 on alternating layers",
            "RoPE (theta 150000), yarn scaling x32",
            "head dim 64",
            "attention biases",
            "attention sinks",
            "32 experts, top-4",
        ],  # fmt: skip
    ),
    "smollm3-3b": (
        "SmolLM3Config",
        dict(
            hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=4
        ),  # fmt: skip
        "SmolLM3",
        [
            "grouped-query attention (4 kv heads)",
            "RoPE (theta 2000000)",
            "no RoPE on every 4th layer",
            "tied embeddings",
        ],  # fmt: skip
    ),
    "olmo2-7b": (
        "Olmo2Config",
        dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32),
        "OLMo 2",
        [
            "multi-head attention (32 heads)",
            "RoPE (theta 10000)",
            "q/k norm",
            "norms after attention and MLP",
        ],  # fmt: skip
    ),
    "granite-3.3-2b": (
        "GraniteConfig",
        dict(
            hidden_size=2048,
            num_hidden_layers=40,
            num_attention_heads=32,
            num_key_value_heads=8,
            embedding_multiplier=12.0,
            attention_multiplier=0.015625,
            residual_multiplier=0.22,
            logits_scaling=8.0,
            tie_word_embeddings=True,
        ),  # fmt: skip
        "Granite",
        [
            "grouped-query attention (8 kv heads)",
            "RoPE (theta 10000)",
            "tied embeddings",
            "multipliers (embedding x12, attention x0.015625, residual x0.22, logits /8)",
        ],  # fmt: skip
    ),
    "phi-4-mini": (
        "Phi3Config",
        dict(
            hidden_size=3072,
            num_hidden_layers=32,
            num_attention_heads=24,
            num_key_value_heads=8,
            partial_rotary_factor=0.75,
            tie_word_embeddings=True,
        ),  # fmt: skip
        "Phi-3",
        [
            "grouped-query attention (8 kv heads)",
            "RoPE (theta 10000)",
            "partial RoPE (75% of each head)",
            "tied embeddings",
        ],  # fmt: skip
    ),
    "falcon-7b": (
        "FalconConfig",
        dict(hidden_size=4544, num_hidden_layers=32, num_attention_heads=71),
        "Falcon",
        [
            "multi-query attention (1 kv head)",
            "RoPE (theta 10000)",
            "LayerNorm",
            "parallel attention and MLP",
            "tied embeddings",
        ],  # fmt: skip
    ),
    "pythia (gpt-neox)": (
        "GPTNeoXConfig",
        dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8),
        "GPT-NeoX",
        [
            "multi-head attention (8 heads)",
            "RoPE (theta 10000)",
            "partial RoPE (25% of each head)",
            "LayerNorm",
            "attention biases",
            "parallel attention and MLP",
        ],  # fmt: skip
    ),
    "gpt2": (
        "GPT2Config",
        {},
        "GPT-2",
        [
            "multi-head attention (12 heads)",
            "learned absolute positions",
            "LayerNorm",
            "tied embeddings",
        ],  # fmt: skip
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_family_and_features_from_transformers_configs(name):
    class_name, values, expected_family, expected = CASES[name]
    config = getattr(transformers, class_name)(**values).to_dict()
    assert family(config) == expected_family
    assert features(config) == expected


# config.json as the hub has it (keys older than transformers 5's normalised ones)
HUB_STYLE = {
    "gemma2": {
        "model_type": "gemma2",
        "hidden_size": 2304,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "vocab_size": 256000,
        "rope_theta": 10000.0,
        "max_position_embeddings": 8192,
    },  # fmt: skip
    "gemma3_text": {
        "model_type": "gemma3_text",
        "hidden_size": 1152,
        "num_hidden_layers": 26,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "vocab_size": 262144,
        "max_position_embeddings": 32768,
    },  # fmt: skip
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },  # fmt: skip
    "llama": {
        "model_type": "llama",
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
    },  # fmt: skip
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "vocab_size": 151936,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
    },  # fmt: skip
}


@pytest.mark.parametrize("model_type", list(HUB_STYLE))
def test_hub_style_configs_read_like_transformers_normalised_ones(model_type):
    hub = HUB_STYLE[model_type]
    normalised = transformers.AutoConfig.for_model(**hub).to_dict()
    assert features(hub) == features(normalised)
    assert family(hub) == family(normalised)


def test_qwen2_with_its_window_switched_off_has_none():
    assert not any("sliding" in f for f in features(HUB_STYLE["qwen2"]))
    assert "q/k/v biases" in features(HUB_STYLE["qwen2"])


def test_show_prints_family_and_features(tmp_path, capsys, smollm2_gguf):
    folder = make_llama(tmp_path / "qwen3", model_type="qwen3", num_key_value_heads=2)
    card = describe(folder)
    assert card.family == "Qwen3" and "q/k norm" in card.features
    assert main(["show", str(folder)]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["family"] == "Qwen3"
    assert lines["features"].startswith("grouped-query attention (2 kv heads), RoPE")
    # A GGUF's config is derived from its metadata (weights/gguf_config.py): same words.
    assert main(["show", str(smollm2_gguf)]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["family"] == "Llama"
    assert lines["features"] == "grouped-query attention (3 kv heads), RoPE (theta 100000), " + (
        "tied embeddings"
    )
