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
# Each architecture's table (llama, qwen2, qwen2moe, gemma, smollm3 and granite share
# Llama's: Qwen2's biases are optional, and the layers' kinds say which MLP tensors each
# must have).
TABLES = {"gpt2": GPT2_TENSORS, "qwen3": QWEN3_TENSORS, "qwen3moe": QWEN3_TENSORS,
          "gemma2": GEMMA2_TENSORS, "gemma3": GEMMA3_TENSORS, "phi3": PHI3_TENSORS,
          "olmo2": OLMO2_TENSORS}  # fmt: skip
# Tensors a file may leave out: lm_head when tied, biases a Llama may not have.
OPTIONAL = re.compile(
    r"lm_head\.weight|model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.\w+_proj)\.bias"
)


def table(architecture: str) -> dict[str, Any]:
    """The table of a GGUF architecture (llama, qwen2, qwen2moe, gemma, smollm3 and granite
    share Llama's)."""
    return TABLES.get(architecture, LLAMA_TENSORS)


def dims(cfg: dict[str, Any]) -> dict[str, int]:
    """The size of each shape symbol of the tables, for the config `cfg`."""
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
