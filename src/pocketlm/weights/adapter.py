"""LoRA adapter folders -> weight deltas merged into a model's float weights.

An adapter is a folder as PEFT writes one (and `pocketlm finetune --lora --adapter-only`
does): `adapter_config.json` (rank `r`, `lora_alpha`, `target_modules`) and
`adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` (A: (r, in))
and `...lora_B.weight` (B: (out, r)). Merged, a targeted nn.Linear's weight becomes
W + (alpha / r) * B @ A (Hu et al. 2021, arXiv:2106.09685). A and B have the same shapes
for GPT-2's Conv1D as for nn.Linear, and our parameters are all in nn.Linear layout.

`read_adapter` reads and checks the folder, `fit_adapter` matches it to a model's nn.Linear
layers (on the `meta` device too, so a loader can know which matrices change before it
reads them), `merge_adapter` folds the deltas in. Knows nothing of training (train/lora.py
wraps layers to train adapters and reuses this reader), of fused or quantized layers (an
adapter is merged before `kernels.prepare`), or of checkpoint files.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from pocketlm.errors import PocketLMError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# Attention projections by default, as the LoRA paper found enough (Section 7.1); Phi-3
# stores q, k and v as one qkv_proj (the others have none before `fuse`, which training skips).
DEFAULT_TARGETS = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj"],
    "fused_qkv": ["query_key_value", "dense"],  # GPT-NeoX, Falcon
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


@dataclass
class Adapter:
    folder: Path
    config: LoRAConfig
    tensors: dict[str, torch.Tensor]  # PEFT key -> A or B, as stored


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


def read_adapter(folder: str | Path) -> Adapter:
    """The adapter saved in `folder`: its config and its tensors (small: rank-r factors)."""
    folder = Path(folder).expanduser()
    config = read_adapter_config(folder)
    check_lora_config(config)
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as error:
        raise PocketLMError(f"{folder / ADAPTER_WEIGHTS} cannot be read ({error})") from None
    return Adapter(folder, config, tensors)


def check_lora_config(config: LoRAConfig) -> None:
    # The messages name the finetune options, which is where a rank or dropout is chosen.
    if config.rank < 1:
        raise PocketLMError(f"--lora-rank must be at least 1 (got {config.rank})")
    if not 0 <= config.dropout < 1:
        raise PocketLMError(f"--lora-dropout must be in [0, 1) (got {config.dropout})")


def family(model: nn.Module) -> str:
    """The DEFAULT_TARGETS family of a native model (GPT-2's is under `transformer`, as
    Falcon's is, whose fused query_key_value it shares with GPT-NeoX)."""
    if getattr(model.config, "model_type", None) in ("gpt_neox", "falcon"):
        return "fused_qkv"
    return "gpt2" if hasattr(model, "transformer") else "llama"


def target_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """The nn.Linear layers of `model` whose last name part is one of `targets` (empty:
    the family's defaults), by module name; at least one, or a one-line error."""
    targets = targets or DEFAULT_TARGETS[family(model)]
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets
    }
    if not found:
        linears = sorted(
            {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise PocketLMError(
            f"--lora-targets {','.join(targets)} match no linear layer; "
            f"this model has: {', '.join(linears)}"
        )
    return found


def fit_adapter(adapter: Adapter, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (A, B) for each layer of `model` the adapter changes, after checking
    that its tensors are exactly those of its targets, in the shapes the layers need."""
    linears = target_linears(model, adapter.config.targets)
    expected = {
        f"{PEFT_PREFIX}{name}.lora_{part}.weight": (name, part, shape)
        for name, linear in linears.items()
        for part, shape in (
            ("A", (adapter.config.rank, linear.in_features)),
            ("B", (linear.out_features, adapter.config.rank)),
        )
    }
    if set(adapter.tensors) != set(expected):
        odd = sorted(set(expected) ^ set(adapter.tensors))
        raise PocketLMError(
            f"{adapter.folder}: adapter does not fit this model (tensor {odd[0]!r})"
        )
    factors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in linears}
    for key, (name, part, shape) in expected.items():
        tensor = adapter.tensors[key]
        if tuple(tensor.shape) != shape:
            raise PocketLMError(
                f"{adapter.folder}: adapter tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"expected {shape}: trained for another model?"
            )
        factors[name][part] = tensor
    return {name: (f["A"], f["B"]) for name, f in factors.items()}


def merge_adapter(
    model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, scale: float
) -> None:
    """Fold each (A, B) of `fit_adapter` into its layer's weight, in place."""
    for name, (a, b) in factors.items():
        merge_delta(model.get_submodule(name).weight, a, b, scale=scale)


@torch.no_grad()
def merge_delta(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, scale: float) -> None:
    """weight += scale * B @ A, in place. A and B are first rounded to the weight's dtype,
    as a LoRALinear in training holds them, and the product is formed in float32."""
    a, b = (t.to(device=weight.device, dtype=weight.dtype) for t in (a, b))
    delta = scale * (b.float() @ a.float())  # (out, in)
    weight.copy_((weight.float() + delta).to(weight.dtype))
