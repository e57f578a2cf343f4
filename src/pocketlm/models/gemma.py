"""Gemma, Gemma 2 and Gemma 3 (text): the Llama block of models/llama.py with the
switches their config.json implies, read here.

What each adds (HF `modeling_gemma.py`, `modeling_gemma2.py`, `modeling_gemma3.py`):
- all: embeddings times sqrt(hidden_size); RMSNorm weights stored as offsets from 1
  (scale by 1 + weight, in fp32); a GeGLU MLP (tanh-approximated GELU); tied embeddings.
- Gemma 2 and 3: the attention's and the MLP's outputs RMS-normed before each residual
  add ("sandwich" norms); scores scaled by query_pre_attn_scalar ** -0.5; sliding-window
  layers alternating with global ones (`layer_types`, or the older sliding_window_pattern:
  every n-th layer global); final logits soft-capped when final_logit_softcapping is set.
- Gemma 2: attention scores soft-capped (attn_logit_softcapping).
- Gemma 3: a per-head RMSNorm of q and k before rotary (as Qwen3, with Gemma's norm); the
  sliding layers rotate at their own base (rope_local_base_freq, never scaled) while
  rope_scaling (linear) applies to the global ones. HF's Gemma 3 attention passes no soft
  cap, whatever attn_logit_softcapping says (llama.cpp's converter requires it unset).

A missing key takes HF's default for the family, so a config.json written by an older
transformers reads as HF reads it. Knows nothing of files, tokenizers or sampling.
"""

from dataclasses import dataclass, fields
from typing import Any

from pocketlm.errors import PocketLMError
from pocketlm.models.llama import LlamaConfig

LAYER_TYPES = ("sliding_attention", "full_attention")

# HF's defaults where a Gemma config class departs from Llama's (GemmaConfig,
# Gemma2Config, Gemma3TextConfig), for keys a config.json leaves out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": {"head_dim": 256, "hidden_act": "gelu_pytorch_tanh"},
    "gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "gemma3_text": {"head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
                    "sliding_window_pattern": 6},
}  # fmt: skip
# Keys whose null in a config.json means "off", not "the default".
_NULLABLE = ("final_logit_softcapping", "attn_logit_softcapping", "sliding_window")


@dataclass
class GemmaConfig(LlamaConfig):
    """Keyed like a Gemma / Gemma 2 / Gemma 3 text config.json; unknown keys are ignored."""

    tie_word_embeddings: bool = True
    hidden_act: str = "gelu_pytorch_tanh"
    hidden_activation: str = "gelu_pytorch_tanh"  # what Gemma 2 and 3 read instead
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_types: list[str] | None = None
    sliding_window_pattern: int | None = None
    rope_local_base_freq: float | None = None
    use_bidirectional_attention: bool | None = None
    model_type: str = "gemma"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GemmaConfig":
        d = {**_DEFAULTS.get(d.get("model_type", "gemma"), {}), **d}
        known = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items()
                      if k in known and (v is not None or k in _NULLABLE)})  # fmt: skip

    def __post_init__(self) -> None:
        kind = self.model_type
        if self.use_bidirectional_attention:
            raise PocketLMError(
                f"a {kind} with use_bidirectional_attention (an embedding model such as "
                "EmbeddingGemma) is not a causal LM; pocketlm does not run it"
            )
        if kind == "gemma":
            # HF's GemmaConfig: "gelu" in a Gemma config means the tanh approximation.
            self.hidden_act = "gelu_pytorch_tanh" if self.hidden_act == "gelu" else self.hidden_act
            self.sliding_window = None
        else:
            self.hidden_act = self.hidden_activation  # what HF's Gemma2MLP / Gemma3MLP read
        local_theta = self._split_rope_parameters() if kind == "gemma3_text" else None
        super().__post_init__()
        self.unit_offset_norms = self.scale_embeddings = True
        if kind == "gemma":
            return
        self.sandwich_norms = True
        self.attention_scale = self.query_pre_attn_scalar**-0.5
        if kind == "gemma2":
            self.attention_softcap = self.attn_logit_softcapping
        self.final_softcap = self.final_logit_softcapping
        sliding = [t == "sliding_attention" for t in self._layer_types()]
        self.layer_windows = [self.sliding_window if s else None for s in sliding]
        if kind == "gemma3_text":
            self.qk_norm = True
            self.local_rope_theta = local_theta or self.rope_local_base_freq

    def _split_rope_parameters(self) -> float | None:
        """transformers 5 writes Gemma 3's rope_parameters per layer type; the global
        layers' become the model's rope_theta / rope_scaling, the sliding layers' base is
        returned (their scaling must be none, as in every released Gemma 3)."""
        params = self.rope_parameters or {}
        if "full_attention" not in params and "sliding_attention" not in params:
            return None
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise PocketLMError(
                f"Gemma 3 with {local['rope_type']!r} rope scaling on its sliding layers "
                "is not supported by pocketlm (only on the global ones)"
            )
        self.rope_parameters = params.get("full_attention") or None
        return local.get("rope_theta")

    def _layer_types(self) -> list[str]:
        n = self.num_hidden_layers
        if self.layer_types is not None:
            if len(self.layer_types) != n or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ValueError(
                    f"layer_types must name one of {LAYER_TYPES} for each of {n} layers"
                )
            return list(self.layer_types)
        # HF's defaults: Gemma 2 alternates from a sliding layer 0; Gemma 3 makes every
        # sliding_window_pattern-th layer global.
        every = 2 if self.model_type == "gemma2" else self.sliding_window_pattern or 6
        return [LAYER_TYPES[(i + 1) % every == 0] for i in range(n)]
