"""Native architectures, keyed by the `model_type` of a checkpoint's config.json."""

from typing import Any

import torch
from torch import nn

from pocketlm.models.cache import KVCache
from pocketlm.models.gemma import GemmaConfig
from pocketlm.models.gpt2 import GPT2, GPT2Config
from pocketlm.models.gpt_oss import GptOssConfig
from pocketlm.models.llama import Llama, LlamaConfig
from pocketlm.models.neox import Falcon, FalconConfig, GPTNeoX, GPTNeoXConfig

# model_type -> (config class, model class). Mistral, Qwen2, Qwen3, Phi-3, SmolLM (1-3),
# OLMo 2, Granite, StableLM, Starcoder2 and the mixtures of experts (Mixtral, Qwen2-MoE,
# Qwen3-MoE) are Llamas with switches their model_type and config.json turn on, and so are
# Gemma 1-3 (GemmaConfig reads their keys) and GPT-OSS (GptOssConfig); GPT-NeoX and
# Falcon share models/neox.py.
# Nothing here keys on file names.
ARCHITECTURES: dict[str, tuple[type, type[nn.Module]]] = {
    "gpt2": (GPT2Config, GPT2),
    "llama": (LlamaConfig, Llama),
    "mistral": (LlamaConfig, Llama),
    "qwen2": (LlamaConfig, Llama),
    "qwen3": (LlamaConfig, Llama),
    "mixtral": (LlamaConfig, Llama),
    "qwen2_moe": (LlamaConfig, Llama),
    "qwen3_moe": (LlamaConfig, Llama),
    "gemma": (GemmaConfig, Llama),
    "gemma2": (GemmaConfig, Llama),
    "gemma3_text": (GemmaConfig, Llama),
    "phi3": (LlamaConfig, Llama),
    "smollm3": (LlamaConfig, Llama),
    "olmo2": (LlamaConfig, Llama),
    "granite": (LlamaConfig, Llama),
    "stablelm": (LlamaConfig, Llama),
    "starcoder2": (LlamaConfig, Llama),
    "gpt_neox": (GPTNeoXConfig, GPTNeoX),
    "falcon": (FalconConfig, Falcon),
    "gpt_oss": (GptOssConfig, Llama),
}


def build_config(config: dict[str, Any]) -> Any:
    """The architecture's config dataclass from a config.json dict (model_type known)."""
    config_cls, _ = ARCHITECTURES[config["model_type"]]
    return config_cls.from_dict(config)


def make_cache(
    model: nn.Module,
    *,
    batch_size: int,
    max_seq_len: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    reserve: bool = False,
) -> KVCache:
    """A KV cache for `model` of up to `batch_size` rows and `max_seq_len` slots (default:
    its context length), in its dtype and on its device. It starts empty and grows in blocks
    as it is written (models/cache.py); `reserve=True` allocates all of it now, for good."""
    c = model.config
    if hasattr(model, "make_cache"):  # a model that keeps its own kind of cache
        return model.make_cache(batch_size=batch_size, max_seq_len=max_seq_len or c.context_length)
    weight = next(model.parameters())
    return KVCache(
        n_layers=c.num_layers,
        batch_size=batch_size,
        max_seq_len=max_seq_len or c.context_length,
        n_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        dtype=dtype or _activation_dtype(weight.dtype),
        device=device or weight.device,
        reserve=reserve,
    )


def _activation_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # Quantized weights (int8) still compute in floating point.
    return weight_dtype if weight_dtype.is_floating_point else torch.float32


__all__ = [
    "ARCHITECTURES",
    "GPT2",
    "Falcon",
    "FalconConfig",
    "GPTNeoX",
    "GPTNeoXConfig",
    "GPT2Config",
    "GemmaConfig",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "build_config",
    "make_cache",
]
