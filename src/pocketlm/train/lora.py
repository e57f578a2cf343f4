"""LoRA: low-rank adapters on a model's nn.Linear layers (Hu et al. 2021, arXiv:2106.09685).

`apply_lora` wraps the chosen Linear layers in `LoRALinear`, which keeps the frozen base
layer and adds `scale * B(A(dropout(x)))` with A (r, in) random and B (out, r) zero, so
the wrapped model starts out identical. `merge_lora` folds `scale * B @ A` into the base
weights and unwraps, leaving a plain model whose parameter names are the original ones.

Adapters are saved as PEFT does (`adapter_config.json` + `adapter_model.safetensors`,
keys `base_model.model.<module>.lora_A.weight`); A and B have the same shapes for GPT-2's
Conv1D as for nn.Linear, so only the base weight's orientation differs (`fan_in_fan_out`).
Knows nothing of training loops, files other than the adapter's, or tokenizers.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from pocketlm.errors import PocketLMError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."

# Attention projections by default, as the LoRA paper found enough (Section 7.1).
DEFAULT_TARGETS = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=list)  # names of Linear layers (last part)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


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

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight (modified in place)."""
        delta = self.scale * (self.lora_B.float() @ self.lora_A.float())  # (out, in)
        self.base.weight.copy_((self.base.weight.float() + delta).to(self.base.weight.dtype))
        return self.base


def family(model: nn.Module) -> str:
    return "gpt2" if hasattr(model, "transformer") else "llama"


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze `model` and wrap its target Linear layers; returns the wrapped names."""
    targets = config.targets or DEFAULT_TARGETS[family(model)]
    if config.rank < 1:
        raise PocketLMError(f"--lora-rank must be at least 1 (got {config.rank})")
    if not 0 <= config.dropout < 1:
        raise PocketLMError(f"--lora-dropout must be in [0, 1) (got {config.dropout})")
    config.targets = list(targets)
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets:
            lora = LoRALinear(module, rank=config.rank, alpha=config.alpha, dropout=config.dropout)
            _replace(model, name, lora)
            wrapped.append(name)
    if not wrapped:
        linears = sorted(
            {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise PocketLMError(
            f"--lora-targets {','.join(targets)} match no linear layer; this model has: {', '.join(linears)}"
        )
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
        state[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().contiguous()
        state[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().contiguous()
    return state


def save_adapter(model: nn.Module, folder: Path, *, config: LoRAConfig, base: str) -> None:
    """Write adapter_config.json + adapter_model.safetensors into `folder` (which exists)."""
    from safetensors.torch import save_file

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


def read_adapter_config(folder: Path) -> LoRAConfig:
    file = Path(folder) / ADAPTER_CONFIG
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        targets = data["target_modules"]
        return LoRAConfig(
            rank=int(data["r"]),
            alpha=float(data["lora_alpha"]),
            dropout=float(data.get("lora_dropout", 0.0)),
            targets=[targets] if isinstance(targets, str) else list(targets),
        )
    except FileNotFoundError:
        raise PocketLMError(f"{folder} is not a LoRA adapter: it has no {ADAPTER_CONFIG}") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PocketLMError(f"{file} is not a valid LoRA adapter config ({error})") from None


def load_adapter(model: nn.Module, folder: Path, *, merge: bool = True) -> nn.Module:
    """Apply the adapter saved in `folder` to `model` (merged into the weights by default)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    config = read_adapter_config(folder)
    apply_lora(model, config)
    try:
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as error:
        raise PocketLMError(f"{folder / ADAPTER_WEIGHTS} cannot be read ({error})") from None
    expected = adapter_state(model)
    if set(state) != set(expected):
        missing = sorted(set(expected) ^ set(state))
        raise PocketLMError(f"{folder}: adapter does not fit this model (tensor {missing[0]!r})")
    modules = lora_modules(model)
    for key, tensor in state.items():
        name, _, part = key.removeprefix(_PEFT_PREFIX).rpartition(".")[0].rpartition(".")
        target = getattr(modules[name], part)
        if target.shape != tensor.shape:
            raise PocketLMError(
                f"{folder}: adapter tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(target.shape)}: trained for another model?"
            )
        with torch.no_grad():
            target.copy_(tensor)
    return merge_lora(model) if merge else model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)
