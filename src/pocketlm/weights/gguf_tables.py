"""GGUF tensor names (llama.cpp's) -> our parameter names and shapes: data, as
weights/tables.py is for Hugging Face names.

Each table maps a GGUF name ("{i}": the block index) to ours and to its shape in config
symbols (outermost first, resolved by `dims`) for the strict checks `weights.gguf` makes.
Which of a block's tensors a file must have depends on the block: a dense or a sparse
(mixture-of-experts) MLP, `layer_templates` says. References: llama.cpp's
`gguf-py/gguf/constants.py` and `tensor_mapping.py`, `convert_hf_to_gguf.py`.
"""

import re
from typing import Any

import numpy as np

# Shapes are in config symbols (resolved by `dims`), outermost first, for the strict check.

LLAMA_TENSORS = {
    "token_embd.weight": ("model.embed_tokens.weight", ("vocab", "hidden")),
    "output_norm.weight": ("model.norm.weight", ("hidden",)),
    "output.weight": ("lm_head.weight", ("vocab", "hidden")),
    "blk.{i}.attn_norm.weight": ("model.layers.{i}.input_layernorm.weight", ("hidden",)),
    "blk.{i}.attn_q.weight": ("model.layers.{i}.self_attn.q_proj.weight", ("q", "hidden")),
    "blk.{i}.attn_q.bias": ("model.layers.{i}.self_attn.q_proj.bias", ("q",)),
    "blk.{i}.attn_k.weight": ("model.layers.{i}.self_attn.k_proj.weight", ("kv", "hidden")),
    "blk.{i}.attn_k.bias": ("model.layers.{i}.self_attn.k_proj.bias", ("kv",)),
    "blk.{i}.attn_v.weight": ("model.layers.{i}.self_attn.v_proj.weight", ("kv", "hidden")),
    "blk.{i}.attn_v.bias": ("model.layers.{i}.self_attn.v_proj.bias", ("kv",)),
    "blk.{i}.attn_output.weight": ("model.layers.{i}.self_attn.o_proj.weight", ("hidden", "q")),
    "blk.{i}.attn_output.bias": ("model.layers.{i}.self_attn.o_proj.bias", ("hidden",)),
    "blk.{i}.ffn_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight", ("hidden",)),
    "blk.{i}.ffn_gate.weight": ("model.layers.{i}.mlp.gate_proj.weight", ("ffn", "hidden")),
    "blk.{i}.ffn_gate.bias": ("model.layers.{i}.mlp.gate_proj.bias", ("ffn",)),
    "blk.{i}.ffn_up.weight": ("model.layers.{i}.mlp.up_proj.weight", ("ffn", "hidden")),
    "blk.{i}.ffn_up.bias": ("model.layers.{i}.mlp.up_proj.bias", ("ffn",)),
    "blk.{i}.ffn_down.weight": ("model.layers.{i}.mlp.down_proj.weight", ("hidden", "ffn")),
    "blk.{i}.ffn_down.bias": ("model.layers.{i}.mlp.down_proj.bias", ("hidden",)),
}
# Mixtures of experts (Mixtral, converted as "llama"; qwen2moe, qwen3moe): the router, and
# each projection of all a layer's experts in one 3-D tensor (experts, rows, cols), which
# we take apart into one matrix per expert ("{e}"); an expert's rows lie together in the
# file, so each is a contiguous slice of the bytes. `--fuse-gate-up-exps` conversions put
# gate and up in one tensor, each expert's gate rows before its up rows. Qwen2-MoE's
# shared expert is a plain MLP beside them, scaled by a sigmoid gate of width 1.
_EXPERT = "model.layers.{i}.mlp.experts.{e}"
_SHARED = "model.layers.{i}.mlp.shared_expert"
MOE_TENSORS = {
    "blk.{i}.ffn_gate_inp.weight": ("model.layers.{i}.mlp.gate.weight", ("experts", "hidden")),
    "blk.{i}.ffn_gate_exps.weight": (f"{_EXPERT}.gate_proj.weight", ("experts", "eff", "hidden")),
    "blk.{i}.ffn_up_exps.weight": (f"{_EXPERT}.up_proj.weight", ("experts", "eff", "hidden")),
    "blk.{i}.ffn_down_exps.weight": (f"{_EXPERT}.down_proj.weight", ("experts", "hidden", "eff")),
    "blk.{i}.ffn_gate_up_exps.weight": (
        (f"{_EXPERT}.gate_proj.weight", f"{_EXPERT}.up_proj.weight"),
        ("experts", "2eff", "hidden"),
    ),
    "blk.{i}.ffn_gate_shexp.weight": (f"{_SHARED}.gate_proj.weight", ("sff", "hidden")),
    "blk.{i}.ffn_up_shexp.weight": (f"{_SHARED}.up_proj.weight", ("sff", "hidden")),
    "blk.{i}.ffn_down_shexp.weight": (f"{_SHARED}.down_proj.weight", ("hidden", "sff")),
    "blk.{i}.ffn_gate_inp_shexp.weight": (
        "model.layers.{i}.mlp.shared_expert_gate.weight",
        ("one", "hidden"),
    ),
}
LLAMA_TENSORS |= MOE_TENSORS
# Which layers hold which MLP tensors: a dense layer the first, a sparse one the others.
_DENSE_FFN = tuple(
    f"blk.{{i}}.ffn_{p}.{k}" for p in ("gate", "up", "down") for k in ("weight", "bias")
)
_SHARED_FFN = tuple(t for t in MOE_TENSORS if "_shexp" in t)
FUSED_FFN = ("blk.{i}.ffn_gate_up_exps.weight",)  # instead of gate and up: never required
# Qwen3: Llama's tensors and the per-head RMSNorm weights of q and k.
QWEN3_TENSORS = {
    **LLAMA_TENSORS,
    "blk.{i}.attn_q_norm.weight": ("model.layers.{i}.self_attn.q_norm.weight", ("head",)),
    "blk.{i}.attn_k_norm.weight": ("model.layers.{i}.self_attn.k_norm.weight", ("head",)),
}

# Gemma 2 and 3: norms on both sides of the attention and the MLP. llama.cpp's ffn_norm is
# the MLP's input norm (HF pre_feedforward_layernorm), its post_attention_norm the norm of
# the attention's output (which HF calls post_attention_layernorm).
GEMMA2_TENSORS = {
    **LLAMA_TENSORS,
    "blk.{i}.post_attention_norm.weight": (
        "model.layers.{i}.post_attention_layernorm.weight", ("hidden",)),
    "blk.{i}.ffn_norm.weight": ("model.layers.{i}.pre_feedforward_layernorm.weight", ("hidden",)),
    "blk.{i}.post_ffw_norm.weight": (
        "model.layers.{i}.post_feedforward_layernorm.weight", ("hidden",)),
}  # fmt: skip
GEMMA3_TENSORS = {
    **GEMMA2_TENSORS,
    "blk.{i}.attn_q_norm.weight": ("model.layers.{i}.self_attn.q_norm.weight", ("head",)),
    "blk.{i}.attn_k_norm.weight": ("model.layers.{i}.self_attn.k_norm.weight", ("head",)),
}
# Phi-3: q/k/v in one matrix (attn_qkv, rows q then k then v) and gate/up in one (ffn_up,
# rows gate then up), as the checkpoint stores them and our fused layers take them.
PHI3_TENSORS = {
    **{k: v for k, v in LLAMA_TENSORS.items() if ".bias" not in k
       and not k.startswith(("blk.{i}.attn_q.", "blk.{i}.attn_k.", "blk.{i}.attn_v.",
                             "blk.{i}.ffn_gate.", "blk.{i}.ffn_up."))},
    "blk.{i}.attn_qkv.weight": ("model.layers.{i}.self_attn.qkv_proj.weight", ("qkv", "hidden")),
    "blk.{i}.ffn_up.weight": ("model.layers.{i}.mlp.gate_up_proj.weight", ("ffn2", "hidden")),
}  # fmt: skip
# OLMo 2: no input norms (its post_attention_layernorm and post_feedforward_layernorm are
# llama.cpp's post norms, as Gemma 2's); q and k each normed whole, not per head.
_INPUT_NORMS = ("blk.{i}.attn_norm.weight", "blk.{i}.ffn_norm.weight")
OLMO2_TENSORS = {
    **{k: v for k, v in GEMMA2_TENSORS.items() if k not in _INPUT_NORMS},
    "blk.{i}.attn_q_norm.weight": ("model.layers.{i}.self_attn.q_norm.weight", ("q",)),
    "blk.{i}.attn_k_norm.weight": ("model.layers.{i}.self_attn.k_norm.weight", ("kv",)),
}

# GPT-OSS: Llama's tensors (its MLP-input norm called post_attention_norm), each head's
# attention sink, and biases on the router and on every expert's projections, each a
# 2-D tensor (experts, width) taken apart into one vector per expert as the matrices are.
GPT_OSS_TENSORS = {
    **{k: v for k, v in LLAMA_TENSORS.items() if k != "blk.{i}.ffn_norm.weight"},
    "blk.{i}.post_attention_norm.weight": (
        "model.layers.{i}.post_attention_layernorm.weight", ("hidden",)),
    "blk.{i}.attn_sinks.weight": ("model.layers.{i}.self_attn.sinks", ("heads",)),
    "blk.{i}.ffn_gate_inp.bias": ("model.layers.{i}.mlp.gate.bias", ("experts",)),
    "blk.{i}.ffn_gate_exps.bias": (f"{_EXPERT}.gate_proj.bias", ("experts", "eff")),
    "blk.{i}.ffn_up_exps.bias": (f"{_EXPERT}.up_proj.bias", ("experts", "eff")),
    "blk.{i}.ffn_down_exps.bias": (f"{_EXPERT}.down_proj.bias", ("experts", "hidden")),
}  # fmt: skip

# llama.cpp's converter already transposes GPT-2's Conv1D weights to (out, in), which is
# our nn.Linear orientation, so nothing is transposed on the way back.
GPT2_TENSORS = {
    "token_embd.weight": ("transformer.wte.weight", ("vocab", "hidden")),
    "position_embd.weight": ("transformer.wpe.weight", ("positions", "hidden")),
    "output_norm.weight": ("transformer.ln_f.weight", ("hidden",)),
    "output_norm.bias": ("transformer.ln_f.bias", ("hidden",)),
    "output.weight": ("lm_head.weight", ("vocab", "hidden")),
    "blk.{i}.attn_norm.weight": ("transformer.h.{i}.ln_1.weight", ("hidden",)),
    "blk.{i}.attn_norm.bias": ("transformer.h.{i}.ln_1.bias", ("hidden",)),
    "blk.{i}.attn_qkv.weight": ("transformer.h.{i}.attn.c_attn.weight", ("qkv", "hidden")),
    "blk.{i}.attn_qkv.bias": ("transformer.h.{i}.attn.c_attn.bias", ("qkv",)),
    "blk.{i}.attn_output.weight": ("transformer.h.{i}.attn.c_proj.weight", ("hidden", "hidden")),
    "blk.{i}.attn_output.bias": ("transformer.h.{i}.attn.c_proj.bias", ("hidden",)),
    "blk.{i}.ffn_norm.weight": ("transformer.h.{i}.ln_2.weight", ("hidden",)),
    "blk.{i}.ffn_norm.bias": ("transformer.h.{i}.ln_2.bias", ("hidden",)),
    "blk.{i}.ffn_up.weight": ("transformer.h.{i}.mlp.c_fc.weight", ("ffn", "hidden")),
    "blk.{i}.ffn_up.bias": ("transformer.h.{i}.mlp.c_fc.bias", ("ffn",)),
    "blk.{i}.ffn_down.weight": ("transformer.h.{i}.mlp.c_proj.weight", ("hidden", "ffn")),
    "blk.{i}.ffn_down.bias": ("transformer.h.{i}.mlp.c_proj.bias", ("hidden",)),
}
# StableLM and Starcoder2: Llama's names, LayerNorms with bias; Starcoder2's MLP is
# c_fc/c_proj (up/down, no gate). StableLM's parallel residual has no ffn_norm.
_NORM_BIASES = {
    "output_norm.bias": ("model.norm.bias", ("hidden",)),
    "blk.{i}.attn_norm.bias": ("model.layers.{i}.input_layernorm.bias", ("hidden",)),
    "blk.{i}.ffn_norm.bias": ("model.layers.{i}.post_attention_layernorm.bias", ("hidden",)),
}
STABLELM_TENSORS = {**LLAMA_TENSORS, **_NORM_BIASES}
STARCODER2_TENSORS = {
    **{k: v for k, v in LLAMA_TENSORS.items() if not k.startswith("blk.{i}.ffn_")},
    **_NORM_BIASES,
    "blk.{i}.ffn_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight", ("hidden",)),
    "blk.{i}.ffn_up.weight": ("model.layers.{i}.mlp.c_fc.weight", ("ffn", "hidden")),
    "blk.{i}.ffn_up.bias": ("model.layers.{i}.mlp.c_fc.bias", ("ffn",)),
    "blk.{i}.ffn_down.weight": ("model.layers.{i}.mlp.c_proj.weight", ("hidden", "ffn")),
    "blk.{i}.ffn_down.bias": ("model.layers.{i}.mlp.c_proj.bias", ("hidden",)),
}


def _neox_tensors(model: tuple[str, str], layers: str, attn: str, norms: dict[str, str]) -> dict:
    """GPT-NeoX's or Falcon's table: fused attn_qkv, LayerNorms and linears with biases.
    `model`: our embedding's and final norm's names; `norms`: GGUF norm -> ours in a block."""
    table = {
        "token_embd.weight": (model[0], ("vocab", "hidden")),
        "output_norm.weight": (f"{model[1]}.weight", ("hidden",)),
        "output_norm.bias": (f"{model[1]}.bias", ("hidden",)),
        "output.weight": ("lm_head.weight", ("vocab", "hidden")),
    }
    block = {
        **{gguf: (ours, ("hidden",)) for gguf, ours in norms.items()},
        "attn_qkv": (f"{attn}.query_key_value", ("qkv", "hidden")),
        "attn_output": (f"{attn}.dense", ("hidden", "hidden")),
        "ffn_up": ("mlp.dense_h_to_4h", ("ffn", "hidden")),
        "ffn_down": ("mlp.dense_4h_to_h", ("hidden", "ffn")),
    }
    for gguf, (ours, shape) in block.items():
        for part in ("weight", "bias"):
            table[f"blk.{{i}}.{gguf}.{part}"] = (
                f"{layers}.{{i}}.{ours}.{part}",
                shape[:1] if part == "bias" else shape,
            )
    return table


GPTNEOX_TENSORS = _neox_tensors(
    ("gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm"), "gpt_neox.layers", "attention",
    {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
)  # fmt: skip
# Falcon's two norms as llama.cpp names them: attn_norm (what its MLP reads) is ln_mlp,
# attn_norm_2 (what its attention reads) is ln_attn; one norm is attn_norm alone.
FALCON_TENSORS = _neox_tensors(
    ("transformer.word_embeddings.weight", "transformer.ln_f"), "transformer.h", "self_attention",
    {"attn_norm": "ln_mlp", "attn_norm_2": "ln_attn"},
)  # fmt: skip
# Each architecture's table (llama, qwen2, qwen2moe, gemma, smollm3 and granite share
# Llama's: Qwen2's biases are optional, and the layers' kinds say which MLP tensors each
# must have).
TABLES = {"gpt2": GPT2_TENSORS, "qwen3": QWEN3_TENSORS, "qwen3moe": QWEN3_TENSORS,
          "gemma2": GEMMA2_TENSORS, "gemma3": GEMMA3_TENSORS, "phi3": PHI3_TENSORS,
          "olmo2": OLMO2_TENSORS, "stablelm": STABLELM_TENSORS,
          "starcoder2": STARCODER2_TENSORS, "gptneox": GPTNEOX_TENSORS,
          "falcon": FALCON_TENSORS, "gpt-oss": GPT_OSS_TENSORS}  # fmt: skip
# Tensors a file may leave out: lm_head when tied, biases a Llama may not have.
OPTIONAL = re.compile(
    r"lm_head\.weight|model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(\w+_proj|c_fc))\.bias"
)


def table(architecture: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The table of a GGUF architecture (llama, qwen2, qwen2moe, gemma, smollm3 and granite
    share Llama's),
    less what the file's config says it has not: biases (GPT-NeoX's attention, Falcon's),
    a norm (StableLM's parallel residual has no ffn_norm; a Falcon with one norm names it
    input_layernorm)."""
    found = TABLES.get(architecture, LLAMA_TENSORS)
    if architecture == "stablelm" and cfg.get("use_parallel_residual"):
        found = {k: v for k, v in found.items() if not k.startswith("blk.{i}.ffn_norm.")}
    if architecture == "gptneox" and not cfg.get("attention_bias"):
        found = _without_biases(found, ("attn_qkv", "attn_output"))
    if architecture == "falcon":
        if not cfg.get("bias"):
            found = _without_biases(found, ("attn_qkv", "attn_output", "ffn_up", "ffn_down"))
        if cfg.get("num_ln_in_parallel_attn") == 1:
            found = {k: (v[0].replace(".ln_mlp.", ".input_layernorm."), v[1])
                     for k, v in found.items() if ".attn_norm_2." not in k}  # fmt: skip
    return found


def _without_biases(found: dict, layers: tuple[str, ...]) -> dict:
    return {k: v for k, v in found.items() if k not in {f"blk.{{i}}.{n}.bias" for n in layers}}


def qkv_rows(cfg: dict[str, Any]) -> np.ndarray:
    """Our query_key_value row i is row order[i] of llama.cpp's attn_qkv. The converter
    writes all query heads, then all keys, then all values; ours keeps each key/value
    head beside its group of queries (models/neox.py), GPT-NeoX being one head a group."""
    H, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    K, D = cfg.get("num_kv_heads") or H, hidden // H
    q = np.arange(H * D).reshape(K, H // K, D)
    k = (H * D + np.arange(K * D)).reshape(K, 1, D)
    v = ((H + K) * D + np.arange(K * D)).reshape(K, 1, D)
    return np.concatenate([q, k, v], axis=1).reshape(-1)  # (K, H/K + 2, D) flattened


def dims(cfg: dict[str, Any]) -> dict[str, int]:
    """The size of each shape symbol of the tables, for the config `cfg`."""
    if cfg["model_type"] in ("gpt_neox", "falcon"):
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        kv_heads = cfg.get("num_kv_heads") or heads
        ffn = cfg.get("intermediate_size") or cfg.get("ffn_hidden_size")
        return {"hidden": hidden, "ffn": ffn, "qkv": (heads + 2 * kv_heads) * hidden // heads,
                "vocab": cfg["vocab_size"]}  # fmt: skip
    if cfg["model_type"] == "gpt2":
        hidden = cfg["n_embd"]
        ffn = cfg["n_inner"] or 4 * hidden
        return {"hidden": hidden, "ffn": ffn, "qkv": 3 * hidden, "vocab": cfg["vocab_size"],
                "positions": cfg["n_positions"]}  # fmt: skip
    expert_ffn = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    return {
        "hidden": cfg["hidden_size"],
        "ffn": cfg["intermediate_size"],
        "ffn2": 2 * cfg["intermediate_size"],  # gate and up in one matrix
        "q": cfg["num_attention_heads"] * cfg["head_dim"],
        "kv": cfg["num_key_value_heads"] * cfg["head_dim"],
        "qkv": (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * cfg["head_dim"],
        "head": cfg["head_dim"],
        "heads": cfg["num_attention_heads"],
        "vocab": cfg["vocab_size"],
        "experts": cfg.get("num_experts") or cfg.get("num_local_experts") or 0,
        "eff": expert_ffn,
        "2eff": 2 * expert_ffn,
        "sff": cfg.get("shared_expert_intermediate_size") or 0,
        "one": 1,
    }


def layer_templates(cfg: dict[str, Any], layer: int, table: dict[str, Any]) -> list[str]:
    """The per-layer tensor names layer `layer` may have: a dense or a sparse MLP's (a
    Mixtral's or Qwen-MoE's layer is sparse where its file has a router, which the
    config's mlp_only_layers says), and a shared expert's where the config has one."""
    templates = [t for t in table if "{i}" in t]
    if cfg["model_type"] == "gpt2":
        return templates
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    sparse = experts and layer not in cfg.get("mlp_only_layers", [])
    shared = sparse and cfg.get("shared_expert_intermediate_size")
    moe = set(MOE_TENSORS) - set(_SHARED_FFN)
    return [
        t
        for t in templates
        if (t not in _DENSE_FFN or not sparse)
        and (t not in moe or sparse)
        and (t not in _SHARED_FFN or shared)
    ]
