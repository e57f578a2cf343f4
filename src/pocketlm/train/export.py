"""A trained model -> a Hugging Face-layout folder in pocketlm's model store.

The folder holds config.json, model.safetensors and the tokenizer files, so `pocketlm
run NAME` and `transformers.AutoModelForCausalLM.from_pretrained(folder)` both load it.
Our parameter names are Hugging Face's; GPT-2's Conv1D weights, which the loader turned
into nn.Linear's (out, in), are transposed back to (in, out) using the loader's own table
(`weights/tables.py`); a tied output head is left out, as `save_pretrained` does.

The folder is assembled in a hidden temporary folder and moved into place with one rename
(`store.staging`), so a crash never leaves half a model under NAME; an existing NAME is
refused unless `overwrite`. Knows nothing of training loops.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pocketlm import paths
from pocketlm.errors import PocketLMError
from pocketlm.tokenizer import Tokenizer
from pocketlm.weights import sources, store, tables

# What `from_pretrained` looks for beside the weights (the tokenizer and generation defaults).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
HF_CLASSES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "granite": "GraniteForCausalLM",
    "stablelm": "StableLmForCausalLM",
    "starcoder2": "Starcoder2ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "falcon": "FalconForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}


def check_output_name(name: str, *, overwrite: bool) -> Path:
    """The store folder NAME will have; refuses a bad name, or a taken one without overwrite."""
    if not sources.STORE_NAME.match(name):
        raise PocketLMError(
            f"--out '{name}' cannot be a model name: use letters, digits, '.', '_' and '-'"
        )
    folder = paths.model_store() / name
    if folder.exists() and not overwrite:
        raise PocketLMError(
            f"a model named '{name}' already exists in {paths.model_store()}; "
            "choose another --out or pass --overwrite"
        )
    return folder


def hf_state_dict(
    model: nn.Module, *, model_type: str, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names and orientations."""
    head, _ = tables.TIED_KEYS[tables.family(model_type)]
    tied = getattr(model.config, "tie_word_embeddings", False)
    state = {}
    for name, tensor in model.state_dict().items():
        if tied and name == head:
            continue  # shares the embedding's storage; transformers re-ties it on load
        tensor = tensor.detach()
        if tables.is_transposed(name, model_type):
            tensor = tensor.t()  # back to Conv1D's (in, out)
        state[tables.hub_name(name, model_type)] = (
            tensor.to(dtype or tensor.dtype).contiguous().cpu()
        )
    if model_type in tables.INTERLEAVED_EXPERTS:  # GPT-OSS: its experts fused, as HF holds them
        state = tables.join_experts(state)
    return state


def hf_config(config: dict[str, Any], *, dtype: torch.dtype) -> dict[str, Any]:
    """The checkpoint's config.json, with what transformers needs to pick the class."""
    out = dict(config)
    out["architectures"] = [HF_CLASSES[config["model_type"]]]
    out["torch_dtype"] = str(dtype).removeprefix("torch.")
    out.pop("dtype", None)
    return out


def write_tokenizer(tokenizer: Tokenizer, folder: Path, *, source: Path | None) -> None:
    """Copy the source's tokenizer files, then add a tokenizer.json and a
    tokenizer_config.json built from the tokenizer itself where the source has none (a
    GGUF model, a bare vocab.json + merges.txt, or no tokenizer files at all), so that
    `transformers` always finds a complete fast tokenizer."""
    if source is not None and source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, folder / name)
    if not (folder / "tokenizer.json").is_file():
        # The tokenizers backend is the complete description; Tokenizer keeps it private.
        tokenizer._backend.save(str(folder / "tokenizer.json"))
    if not (folder / "tokenizer_config.json").is_file():
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": tokenizer.add_bos,
            "clean_up_tokenization_spaces": False,
            **tokenizer.special_tokens,
        }
        if tokenizer.chat_template:
            config["chat_template"] = tokenizer.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_model_folder(
    folder: Path,
    model: nn.Module,
    *,
    config: dict[str, Any],
    tokenizer: Tokenizer,
    source: Path | None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """config.json, model.safetensors and tokenizer files into an existing `folder`."""
    from safetensors.torch import save_file

    save_file(
        hf_state_dict(model, model_type=config["model_type"], dtype=dtype),
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (folder / "config.json").write_text(json.dumps(hf_config(config, dtype=dtype), indent=2) + "\n")
    write_tokenizer(tokenizer, folder, source=source)


def export_to_store(
    name: str,
    model: nn.Module,
    *,
    config: dict[str, Any],
    tokenizer: Tokenizer,
    source: Path | None,
    base: str,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Register the model as NAME in the store (one atomic rename); its folder."""
    check_output_name(name, overwrite=overwrite)
    with store.staging(
        name, source=f"finetune:{base}", extra={"finetuned_from": base, **(extra or {})}
    ) as work:
        write_model_folder(
            work, model, config=config, tokenizer=tokenizer, source=source, dtype=dtype
        )
    return paths.model_store() / name
