"""SmolLM3, OLMo 2 and Granite: the switches their model_type turns on in the Llama block
(models/llama.py), read from their own config keys as transformers' classes read them
(HF `configuration_smollm3.py`, `modeling_olmo2.py`, `modeling_granite.py`). Other
families' classes ignore these keys, so here they are reset for every other model_type.
Knows nothing of files, tokenizers or sampling.
"""

from typing import Any

from pocketlm.errors import PocketLMError


def variant_switches(config: Any) -> None:
    """Set a LlamaConfig's derived switches (layer_rotary, input_norms, sandwich_norms,
    qk_norm_across_heads, attention_scale) from its model_type and keys, in place."""
    kind, layers = config.model_type, config.num_layers
    if kind != "smollm3":
        config.no_rope_layers = None
    elif config.no_rope_layers is None:  # HF SmolLM3Config's default: every n-th is NoPE
        every = config.no_rope_layer_interval
        config.no_rope_layers = [int((i + 1) % every != 0) for i in range(layers)]
    config.layer_rotary = [bool(r) for r in config.no_rope_layers or [1] * layers]
    # OLMo 2 norms each sublayer's output (Gemma's sandwich without its input half) and
    # RMS-norms all of q and all of k, not each head.
    olmo2 = kind == "olmo2"
    config.input_norms, config.sandwich_norms = not olmo2, config.sandwich_norms or olmo2
    config.qk_norm_across_heads = olmo2
    if kind != "granite":
        config.embedding_multiplier = config.residual_multiplier = config.logits_scaling = 1.0
        config.attention_multiplier = None
    else:
        if config.attention_multiplier is None:
            config.attention_multiplier = 1.0  # GraniteConfig's default, not 1/sqrt(D)
        config.attention_scale = config.attention_multiplier
    if kind == "smollm3" and config.sliding_window is not None:
        # SmolLM3 windows only its NoPE layers; no released one does.
        raise PocketLMError("SmolLM3 with use_sliding_window is not supported by pocketlm")
    if kind in ("olmo2", "granite"):  # their modeling has no window, whatever a config says
        config.sliding_window, config.layer_windows = None, [None] * layers
