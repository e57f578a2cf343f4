"""How checkpoint tensor names and layouts map onto pocketlm's parameters: data, not code.

Our parameter names are the Hugging Face ones, so for HF checkpoints the table is mostly
about the exceptions: prefixes that differ between old and new checkpoints, buffers some
checkpoints carry that are not parameters, GPT-2's Conv1D weights, which are stored
(in, out) and must be transposed to nn.Linear's (out, in), and mixture-of-experts weights
stored as one 3-D tensor for all experts, which we keep as one matrix per expert.
"""

import re

import torch

# Old GPT-2 checkpoints (openai-community/gpt2) omit the "transformer." prefix. Mixtral's
# checkpoints (as on the hub, and as transformers 5 still saves them) call the MoE MLP
# `block_sparse_moe` and its experts' gate/down/up projections w1/w2/w3.
KEY_PREFIXES: dict[str, dict[str, str]] = {
    "gpt2": {r"^(wte|wpe|h|ln_f)\.": r"transformer.\1."},
    "llama": {
        r"\.block_sparse_moe\.": ".mlp.",
        r"(\.experts\.\d+)\.w1\.": r"\1.gate_proj.",
        r"(\.experts\.\d+)\.w2\.": r"\1.down_proj.",
        r"(\.experts\.\d+)\.w3\.": r"\1.up_proj.",
        r"\.mlp\.router\.": ".mlp.gate.",  # GPT-OSS's name for the router
    },
    # GPT-NeoX's head is `embed_out` in its checkpoints (transformers 5 renames it too).
    "gpt_neox": {r"^embed_out\.": "lm_head."},
}

# The way back, for an export that transformers and other tools load: per model_type,
# since Mixtral alone among the Llama-named families keeps those old names on the hub.
HUB_NAMES: dict[str, dict[str, str]] = {
    "mixtral": {
        r"\.mlp\.": ".block_sparse_moe.",
        r"(\.experts\.\d+)\.gate_proj\.": r"\1.w1.",
        r"(\.experts\.\d+)\.down_proj\.": r"\1.w2.",
        r"(\.experts\.\d+)\.up_proj\.": r"\1.w3.",
    },
    "gpt_oss": {r"\.mlp\.gate\.": ".mlp.router."},  # its experts: join_experts
}

# transformers 5 holds a MoE layer's experts as two 3-D parameters, gate and up side by
# side in one: `mlp.experts.gate_up_proj` (E, 2 * width, C) and `mlp.experts.down_proj`
# (E, C, width). It saves the per-expert names above, but a checkpoint written from its
# state dict directly has these. GPT-OSS's checkpoints have only this form, with biases
# beside (`gate_up_proj_bias` (E, 2 * width), `down_proj_bias` (E, C)), each matrix stored
# (in, out) rather than nn.Linear's (out, in), and gate and up interleaved along the
# gate_up axis (0, 2, 4... gate; 1, 3, 5... up) rather than in halves.
FUSED_EXPERTS = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)(\.weight|_bias)?")
# The hub's GPT-OSS checkpoints keep those two matrices in MXFP4 instead (config.json's
# quantization_config says mxfp4): `<name>_blocks` (E, out, in / 32, 16) and `<name>_scales`
# (E, out, in / 32), in (out, in) order; weights/dequant.py's hf_mxfp4 decodes them.
MXFP4_PARTS = re.compile(r"(.*\.mlp\.experts\.(?:gate_up_proj|down_proj))_(blocks|scales)")
# The model types whose fused experts are stored as GPT-OSS's are: (in, out), interleaved.
INTERLEAVED_EXPERTS = ("gpt_oss",)

# Tensors some checkpoints carry that are not parameters: causal-mask buffers in older
# GPT-2 files, precomputed rotary frequencies in older Llama files.
IGNORED_KEYS: dict[str, list[str]] = {
    "gpt2": [r"\.attn\.bias$", r"\.attn\.masked_bias$"],
    "llama": [r"rotary_emb\.inv_freq$"],
    "gpt_neox": [r"\.attention\.bias$", r"\.attention\.masked_bias$", r"rotary_emb\.inv_freq$"],
    "falcon": [r"rotary_emb\.inv_freq$"],
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
    "gpt_neox": ("lm_head.weight", "gpt_neox.embed_in.weight"),
    "falcon": ("lm_head.weight", "transformer.word_embeddings.weight"),
}


def family(model_type: str) -> str:
    """Tables are per family: Mistral, Qwen2, Qwen3, StableLM, Starcoder2 and the MoE
    checkpoints name tensors as Llama does (their own layers are named as our parameters
    are); GPT-NeoX and Falcon have their own."""
    return model_type if model_type in ("gpt2", "gpt_neox", "falcon") else "llama"


def rename(key: str, model_type: str) -> str:
    for pattern, replacement in KEY_PREFIXES.get(family(model_type), {}).items():
        key = re.sub(pattern, replacement, key)
    return key


def hub_name(key: str, model_type: str) -> str:
    """Our parameter name -> the checkpoint's, as the hub's files of `model_type` have it."""
    for pattern, replacement in HUB_NAMES.get(model_type, {}).items():
        key = re.sub(pattern, replacement, key)
    return key


def is_ignored(key: str, model_type: str) -> bool:
    return any(re.search(p, key) for p in IGNORED_KEYS.get(family(model_type), []))


def is_transposed(key: str, model_type: str) -> bool:
    return any(re.search(p, key) for p in TRANSPOSED_KEYS.get(family(model_type), []))


def split_experts(
    name: str, tensor: torch.Tensor, model_type: str
) -> list[tuple[str, torch.Tensor]] | None:
    """A fused expert tensor (see FUSED_EXPERTS) as (name, matrix or bias) per expert, in
    nn.Linear orientation; None for any other tensor (or one of the wrong rank)."""
    m = FUSED_EXPERTS.fullmatch(name)
    is_bias = m is not None and m[3] == "_bias"
    if m is None or tensor.dim() != (2 if is_bias else 3):
        return None
    prefix, kind, suffix = m[1], m[2], "bias" if is_bias else "weight"
    interleaved = model_type in INTERLEAVED_EXPERTS
    out = []
    for e, part in enumerate(tensor):
        if interleaved and not is_bias:
            part = part.t()  # (in, out) -> (out, in)
        if kind == "down_proj":
            out.append((f"{prefix}.{e}.down_proj.{suffix}", part))
            continue
        gate, up = (part[::2], part[1::2]) if interleaved else part.chunk(2, dim=0)
        out += [(f"{prefix}.{e}.gate_proj.{suffix}", gate), (f"{prefix}.{e}.up_proj.{suffix}", up)]
    return out


def join_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """split_experts undone for GPT-OSS's layout (INTERLEAVED_EXPERTS), for an export that
    transformers loads: each layer's per-expert matrices and biases as its fused, (in, out),
    gate/up-interleaved tensors."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}  # layer -> part -> expert
    for name, tensor in state.items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)", name)
        if m is None:
            out[name] = tensor
            continue
        experts.setdefault(m[1], {}).setdefault(f"{m[3]}.{m[4]}", {})[int(m[2])] = tensor

    def stacked(parts: dict[int, torch.Tensor]) -> torch.Tensor:  # (E, ...) in expert order
        return torch.stack([parts[e] for e in sorted(parts)])

    for prefix, parts in experts.items():
        for suffix in ("weight", "bias"):
            gate, up = stacked(parts[f"gate_proj.{suffix}"]), stacked(parts[f"up_proj.{suffix}"])
            gate_up = torch.stack((gate, up), dim=2).flatten(1, 2)  # (E, 2F, ...): g0 u0 g1 u1
            down = stacked(parts[f"down_proj.{suffix}"])
            if suffix == "weight":  # nn.Linear's (out, in) -> (in, out)
                gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
            tail = "" if suffix == "weight" else "_bias"
            out[f"{prefix}.gate_up_proj{tail}"] = gate_up.contiguous()
            out[f"{prefix}.down_proj{tail}"] = down.contiguous()
    return out
