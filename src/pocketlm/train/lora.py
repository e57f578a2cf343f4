"""LoRA: low-rank adapters on a model's nn.Linear layers (Hu et al. 2021, arXiv:2106.09685).

`apply_lora` wraps the chosen Linear layers in `LoRALinear`, which keeps the frozen base
layer and adds `scale * B(A(dropout(x)))` with A (r, in) random and B (out, r) zero, so
the wrapped model starts out identical. `merge_lora` folds `scale * B @ A` into the base
weights and unwraps, leaving a plain model whose parameter names are the original ones.

Adapters are saved as PEFT does (`adapter_config.json` + `adapter_model.safetensors`,
keys `base_model.model.<module>.lora_A.weight`); A and B have the same shapes for GPT-2's
Conv1D as for nn.Linear, so only the base weight's orientation differs (`fan_in_fan_out`).
Reading an adapter folder, matching it to a model and merging it live in
`pocketlm.weights.adapter` (the loader merges adapters too); this module trains them.
Knows nothing of training loops, files other than the adapter's, or tokenizers.
"""

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from pocketlm.weights.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DEFAULT_TARGETS,
    PEFT_PREFIX,
    LoRAConfig,
    check_lora_config,
    family,
    fit_adapter,
    merge_adapter,
    merge_delta,
    read_adapter,
    target_linears,
)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base.weight
        self.lora_A = nn.Parameter(
            torch.empty(rank, base.in_features, device=weight.device, dtype=weight.dtype)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) do

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()  # (..., out)
        return self.base(x) + self.scale * update

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight (modified in place)."""
        merge_delta(self.base.weight, self.lora_A, self.lora_B, scale=self.scale)
        return self.base


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze `model` and wrap its target Linear layers; returns the wrapped names."""
    targets = config.targets or DEFAULT_TARGETS[family(model)]
    check_lora_config(config)
    config.targets = list(targets)
    model.requires_grad_(False)
    wrapped = list(target_linears(model, config.targets))
    for name in wrapped:
        lora = LoRALinear(
            model.get_submodule(name), rank=config.rank, alpha=config.alpha, dropout=config.dropout
        )
        _replace(model, name, lora)
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and unwrap it; returns `model`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace(model, name, module.merged())
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().contiguous()
    return state


def save_adapter(model: nn.Module, folder: Path, *, config: LoRAConfig, base: str) -> None:
    """Write adapter_config.json + adapter_model.safetensors into `folder` (which exists)."""
    save_file(adapter_state(model), str(folder / ADAPTER_WEIGHTS))
    peft = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.targets,
        "bias": "none",
        "fan_in_fan_out": family(model) == "gpt2",  # GPT-2's base weights are Conv1D
        "pocketlm": asdict(config),
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(peft, indent=2) + "\n")


def load_adapter(model: nn.Module, folder: Path, *, merge: bool = True) -> nn.Module:
    """Apply the adapter saved in `folder` to `model`: merged into the weights (as the
    loader does), or wrapped in LoRALinear layers holding it, to train on from there."""
    adapter = read_adapter(folder)
    factors = fit_adapter(adapter, model)
    if merge:
        merge_adapter(model, factors, scale=adapter.config.scale)
        return model
    apply_lora(model, adapter.config)
    modules = lora_modules(model)
    with torch.no_grad():
        for name, (a, b) in factors.items():
            modules[name].lora_A.copy_(a)
            modules[name].lora_B.copy_(b)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)
