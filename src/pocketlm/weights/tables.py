"""How checkpoint tensor names and layouts map onto pocketlm's parameters: data, not code.

Our parameter names are the Hugging Face ones, so for HF checkpoints the table is mostly
about the exceptions: prefixes that differ between old and new checkpoints, buffers some
checkpoints carry that are not parameters, and GPT-2's Conv1D weights, which are stored
(in, out) and must be transposed to nn.Linear's (out, in).
"""

import re

# Old GPT-2 checkpoints (openai-community/gpt2) omit the "transformer." prefix.
KEY_PREFIXES: dict[str, dict[str, str]] = {
    "gpt2": {r"^(wte|wpe|h|ln_f)\.": r"transformer.\1."},
}

# Tensors some checkpoints carry that are not parameters: causal-mask buffers in older
# GPT-2 files, precomputed rotary frequencies in older Llama files.
IGNORED_KEYS: dict[str, list[str]] = {
    "gpt2": [r"\.attn\.bias$", r"\.attn\.masked_bias$"],
    "llama": [r"rotary_emb\.inv_freq$"],
}

# GPT-2 uses Conv1D, whose weight is (in_features, out_features): transpose to Linear's.
TRANSPOSED_KEYS: dict[str, list[str]] = {
    "gpt2": [
        r"\.attn\.c_attn\.weight$",
        r"\.attn\.c_proj\.weight$",
        r"\.mlp\.c_fc\.weight$",
        r"\.mlp\.c_proj\.weight$",
    ],
}

# The output head shares the input embedding when the config says so.
TIED_KEYS: dict[str, tuple[str, str]] = {
    "gpt2": ("lm_head.weight", "transformer.wte.weight"),
    "llama": ("lm_head.weight", "model.embed_tokens.weight"),
}


def family(model_type: str) -> str:
    """Tables are per family: Mistral, Qwen2 and Qwen3 checkpoints name tensors as Llama
    does (Qwen3's q_norm and k_norm are named as our parameters are)."""
    return "gpt2" if model_type == "gpt2" else "llama"


def rename(key: str, model_type: str) -> str:
    for pattern, replacement in KEY_PREFIXES.get(family(model_type), {}).items():
        key = re.sub(pattern, replacement, key)
    return key


def is_ignored(key: str, model_type: str) -> bool:
    return any(re.search(p, key) for p in IGNORED_KEYS.get(family(model_type), []))


def is_transposed(key: str, model_type: str) -> bool:
    return any(re.search(p, key) for p in TRANSPOSED_KEYS.get(family(model_type), []))
