"""GPT-OSS (openai/gpt-oss-20b, -120b): the Llama block of models/llama.py, every layer a
mixture of experts (models/moe.py), with the switches its config.json implies, read here.

What it adds (HF `modeling_gpt_oss.py`):
- attention: q/k/v/o biases; a learned "sink" logit per head that joins each softmax and
  is dropped after it (layers.explicit_attention); sliding-window layers (128) alternating
  with full ones, by `layer_types` (HF's default: even layers slide).
- experts: the router has a bias and softmaxes its top-k logits, which is the same as
  Mixtral's softmax, top-k, renormalise; each expert is a SwiGLU MLP with biases whose
  gate is clamped from above and up both ways at swiglu_limit, the gate scaled by
  sigmoid(swiglu_alpha * gate) and 1 added to up.
- rotary: YaRN scaling in every released checkpoint (rope_parameters; models/llama.py's
  rope_inv_freq says which types it computes).
HF stores the experts of a layer fused, gate and up interleaved along the last axis, which
weights/tables.py takes apart into the per-expert Llama MLPs used here.

A missing key takes HF's GptOssConfig default. Knows nothing of files, tokenizers or sampling.
"""

from dataclasses import dataclass, fields
from typing import Any

from pocketlm.models.llama import LlamaConfig

LAYER_TYPES = ("sliding_attention", "full_attention")

# HF GptOssConfig's defaults where they depart from Llama's.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880, "head_dim": 64,
    "num_hidden_layers": 36, "num_attention_heads": 64, "num_key_value_heads": 8,
    "num_local_experts": 128, "num_experts_per_tok": 4, "sliding_window": 128,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 150000.0,
    "attention_bias": True,
    "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                        "beta_slow": 1.0, "truncate": False,
                        "original_max_position_embeddings": 4096},
}  # fmt: skip


@dataclass
class GptOssConfig(LlamaConfig):
    """Keyed like a GPT-OSS config.json; unknown keys are ignored."""

    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    layer_types: list[str] | None = None
    model_type: str = "gpt_oss"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GptOssConfig":
        d = {**_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
        known = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in known})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mlp_bias = True  # the experts' projections (there is no dense MLP)
        self.norm_topk_prob = True  # softmax of the top-k logits = softmax, top-k, renormalise
        self.attention_sinks = self.router_bias = True
        self.swiglu_clamp = (self.swiglu_alpha, self.swiglu_limit)
        sliding = [t == "sliding_attention" for t in self._layer_types()]
        self.layer_windows = [self.sliding_window if s else None for s in sliding]

    def _layer_types(self) -> list[str]:
        n = self.num_hidden_layers
        if self.layer_types is None:  # HF's default: layer i slides where i is even
            return [LAYER_TYPES[i % 2] for i in range(n)]
        if len(self.layer_types) != n or not set(self.layer_types) <= set(LAYER_TYPES):
            raise ValueError(f"layer_types must name one of {LAYER_TYPES} for each of {n} layers")
        return list(self.layer_types)
