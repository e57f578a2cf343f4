"""Several LoRA adapters served at once over one copy of a model's weights, unmerged.

Each layer an adapter changes is wrapped, once, in a `MultiLoRALinear`: it calls the layer
as it is (nn.Linear, a split fp32 matmul, int8/int4, a GGUF matrix kept as stored) and adds
`scale_i * B_i(A_i(x))` to the rows of the batch that use adapter i. Which adapter each row
uses is set before each forward (`MultiLoRA.select`, by the scheduler, for a prefill's one
row as for a decode step's many) and read by every wrapped layer; the low-rank work is done
once per adapter present in the batch, on the gathered rows of that adapter (S-LoRA, Sheng
et al. 2023, arXiv:2311.03285; Punica, Chen et al. 2023), never a loop over rows. A batch
of base rows alone adds nothing but an empty loop per wrapped layer; a model served with no
adapter has no wrapper at all.

The choice is per thread: the scheduler's thread sets it, and another thread running the
same model (the server's embeddings) sees the base alone.

Adapters name the checkpoint's layers (`...self_attn.q_proj`); `fuse()` may have joined
q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`, rows in that order. A part's
update then goes into its rows of the joined layer: A's of the parts stacked (sum r, in),
B's placed block-diagonally in (out, sum r), so it stays one pair of matmuls.

Factors arrive fitted (pocketlm.weights.adapter.fit_adapter checks them against the
checkpoint's layers); this module knows nothing of files, HTTP or sampling.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import nn

from pocketlm.errors import PocketLMError

# A layer `fuse()` makes -> the checkpoint's layers it joins, in the order of its rows
# (models/llama.py Attention.fuse and MLP.fuse).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # checkpoint layer name -> (A, B)


class Selection(threading.local):
    """The adapter groups of the next forward on this thread: (adapter index, the rows that
    use it, or None when every row does). A thread that set nothing sees none."""

    groups: tuple[tuple[int, torch.Tensor | None], ...] = ()
    key: tuple[int, ...] = ()  # the row adapters these groups were made for
    rows: int = 0


class MultiLoRALinear(nn.Module):
    """A layer plus, for the rows of each adapter, that adapter's low-rank update."""

    def __init__(self, base: nn.Module, selection: Selection) -> None:
        super().__init__()
        self.base = base
        self.selection = selection
        # adapter index -> (A^T (in, R), (scale * B)^T (R, out)), or None where that adapter
        # leaves this layer alone; index 0 is the base alone
        self.factors: list[tuple[torch.Tensor, torch.Tensor] | None] = [None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for index, rows in self.selection.groups:
            factors = self.factors[index]
            if factors is None:
                continue
            a, b = factors
            if rows is None:  # every row of the batch uses this adapter
                y = y + ((x @ a) @ b).to(y.dtype)
            else:
                if x.shape[0] != self.selection.rows:  # e.g. a layer fed (B * T, C)
                    raise PocketLMError(
                        "this adapter's layer does not take the batch's rows as its first "
                        "axis: serve it alone (one adapter per batch) or merge it"
                    )
                update = (x.index_select(0, rows) @ a) @ b  # (G, ..., out)
                y = y.index_add(0, rows, update.to(y.dtype))
        return y


class MultiLoRA:
    """The adapters attached to a prepared model: their names and indices (1, 2, ...; 0
    is the base alone), the wrapped layers, and each row's choice."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.selection = Selection()
        self.layers: dict[str, MultiLoRALinear] = {}  # wrapped layer name -> its wrapper
        self.names: dict[str, int] = {}  # adapter name -> index
        weight = next(model.parameters())
        # the activations' dtype, as make_cache chooses it (quantized weights compute in float)
        self.dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.device = weight.device

    @property
    def count(self) -> int:
        return len(self.names)

    def index(self, name: str | None) -> int:
        """The index of adapter `name` (None: the base, 0); KeyError for one not attached."""
        return 0 if name is None else self.names[name]

    def add(self, name: str, factors: Factors, *, scale: float, reference: nn.Module) -> int:
        """Attach one adapter's fitted factors under `name`; its index. `reference`: the
        model in the checkpoint's own layers (on the `meta` device will do), for the rows
        of the fused layers."""
        placed: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        widths: dict[str, int] = {}
        for layer_name, (a, b) in factors.items():
            target, offset, width = _place(self.model, reference, layer_name)
            placed.setdefault(target, []).append((offset, a, b))
            widths[target] = width
        self.names[name] = self.count + 1
        for target, parts in placed.items():
            a, b = _stack(parts, widths[target])
            b = b * scale
            # rounded to the activations' dtype as a merge rounds them to the weight's
            pair = tuple(t.t().contiguous().to(self.device, self.dtype) for t in (a, b))
            layer = self._wrapper(target)
            layer.factors.append(pair)
            # also as buffers, so that what the model holds counts them (a server's budget)
            for part, tensor in zip("AB", pair, strict=True):
                layer.register_buffer(f"lora_{part}{self.count}", tensor, persistent=False)
        for layer in self.layers.values():  # the layers this adapter leaves alone
            layer.factors += [None] * (self.count + 1 - len(layer.factors))
        return self.count

    def select(self, adapters: Sequence[int]) -> None:
        """The adapter of each row of the next forward on this thread (0: the base alone)."""
        key = tuple(adapters)
        selection = self.selection
        if key == selection.key:  # a decode step like the one before: the same groups
            return
        groups = []
        for index in sorted(set(key) - {0}):
            rows = [i for i, a in enumerate(key) if a == index]
            every = len(rows) == len(key)
            groups.append((index, None if every else torch.tensor(rows, device=self.device)))
        selection.groups, selection.key, selection.rows = tuple(groups), key, len(key)

    def _wrapper(self, name: str) -> MultiLoRALinear:
        if name not in self.layers:
            parent, _, attr = name.rpartition(".")
            owner = self.model.get_submodule(parent)
            layer = MultiLoRALinear(getattr(owner, attr), self.selection)
            layer.factors += [None] * (self.count - 1)  # the adapters attached before
            setattr(owner, attr, layer)
            self.layers[name] = layer
        return self.layers[name]


def _place(model: nn.Module, reference: nn.Module, name: str) -> tuple[str, int, int]:
    """Where checkpoint layer `name`'s update goes in the prepared `model`: (layer name,
    first output row, that layer's output width)."""
    width = reference.get_submodule(name).out_features
    if _has(model, name):
        return name, 0, width
    parent, _, attr = name.rpartition(".")
    for fused, parts in FUSED.items():
        if attr in parts and _has(model, f"{parent}.{fused}"):
            widths = [reference.get_submodule(f"{parent}.{p}").out_features for p in parts]
            return f"{parent}.{fused}", sum(widths[: parts.index(attr)]), sum(widths)
    raise PocketLMError(f"an adapter changes {name}, which this model no longer has as a layer")


def _has(model: nn.Module, name: str) -> bool:
    try:
        return model.get_submodule(name) is not None
    except AttributeError:
        return False


def _stack(
    parts: list[tuple[int, torch.Tensor, torch.Tensor]], width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (A, B) pair for the parts of a layer: A's stacked (R, in), each B in its own
    rows and rank columns of (width, R), zero elsewhere."""
    a = torch.cat([p[1].float() for p in parts])  # (R, in)
    b = torch.zeros(width, len(a))  # (out, R)
    rank = 0
    for offset, part_a, part_b in parts:
        b[offset : offset + len(part_b), rank : rank + len(part_a)] = part_b.float()
        rank += len(part_a)
    return a, b
