"""Hidden states and embeddings: the residual stream after any layer (numbered like HF
`hidden_states`: 0 = embeddings, i = after block i, the last = final-normed), pooled or per
token, batched with right padding (padding sits at later positions, which the causal mask
already hides from every real token).

Knows nothing of text, files, the terminal or HTTP. B = batch, T = time, C = channels.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.errors import PocketLMError
from pocketlm.features import POOLS
from pocketlm.features.scores import check_ids


@dataclass
class Embeddings:
    """One vector per input: (C,) when pooled, (T, C) per token with pool="none";
    float32 on the CPU."""

    vectors: list[torch.Tensor]
    layer: int  # the layer used, counted from 0 (a negative request resolved)
    pool: str
    tokens: list[int]  # token count of each input


def resolve_layer(model: nn.Module, layer: int) -> int:
    """A layer number in 0..num_layers (negative counts from the end, -1 = last)."""
    n = model.config.num_layers + 1  # the embeddings, then one output per block
    if not -n <= layer < n:
        raise PocketLMError(
            f"layer {layer} is out of range: this model has layers 0..{n - 1} "
            f"(0 = embeddings, {n - 1} = final) or -{n}..-1 from the end"
        )
    return layer % n


def hidden_states(
    model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, *, layer: int
) -> torch.Tensor:
    """The residual stream (B, T, C) after `layer` (already resolved), computing no block
    beyond it."""
    with torch.inference_mode():
        for i, x in enumerate(model.layer_outputs(tokens, positions)):
            if i == layer:
                return x
    raise ValueError(f"the model yielded no layer {layer}")


def embed(
    model: nn.Module,
    batch_of_ids: Sequence[Sequence[int]],
    *,
    layer: int = -1,
    pool: str = "mean",
    normalize: bool = False,
    batch_size: int = 8,
) -> Embeddings:
    """Hidden states of `layer` for each id list: the mean over its tokens, its last
    token, or every token (pool="none"); L2-normalized when asked. Inputs run
    `batch_size` at a time, sorted by length so rows of a batch pad little."""
    if pool not in POOLS:
        raise PocketLMError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
    if batch_size < 1:
        raise PocketLMError(f"batch size must be at least 1 (got {batch_size})")
    layer = resolve_layer(model, layer)
    limit, vocab = model.config.context_length, model.config.vocab_size
    for i, ids in enumerate(batch_of_ids):
        if not ids:
            raise PocketLMError(f"input {i} is empty: give some text to embed")
        if len(ids) > limit:
            raise PocketLMError(f"input {i} is {len(ids)} tokens; the context window is {limit}")
        check_ids(ids, vocab_size=vocab)
    order = sorted(range(len(batch_of_ids)), key=lambda i: len(batch_of_ids[i]))
    vectors: list[torch.Tensor | None] = [None] * len(order)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        for i, vector in zip(
            rows,
            _embed_batch(model, [batch_of_ids[i] for i in rows], layer=layer, pool=pool),
            strict=True,
        ):
            vectors[i] = F.normalize(vector, dim=-1) if normalize else vector
    return Embeddings(vectors, layer, pool, [len(ids) for ids in batch_of_ids])


def _embed_batch(
    model: nn.Module, batch: list[Sequence[int]], *, layer: int, pool: str
) -> list[torch.Tensor]:
    """One right-padded batch. Every row gets positions 0..T-1; a pad sits after the
    row's real tokens, so by the causal mask no real token attends to it."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(ids) for ids in batch], device=device)  # (B,)
    T = int(lengths.max())
    tokens = torch.zeros(len(batch), T, dtype=torch.long, device=device)  # pad id 0: any valid id
    for row, ids in enumerate(batch):
        tokens[row, : len(ids)] = torch.tensor(list(ids), device=device)
    positions = torch.arange(T, device=device).expand(len(batch), T)  # (B, T)
    x = hidden_states(model, tokens, positions, layer=layer).float()  # (B, T, C)
    real = (positions < lengths[:, None]).unsqueeze(-1)  # (B, T, 1)
    if pool == "mean":
        pooled = (x * real).sum(1) / lengths[:, None]  # (B, C)
    elif pool == "last":
        pooled = x[torch.arange(len(batch), device=device), lengths - 1]  # (B, C)
    else:
        return [x[row, : len(ids)].cpu() for row, ids in enumerate(batch)]
    return list(pooled.cpu())
