"""What the model computes, exposed exactly: token log-probabilities, perplexity, hidden
states and embeddings.

Pure functions of (model, token ids): they know nothing of text, files, the terminal or
HTTP, so the CLI, the Python API and the server all call the same code. Every forward
pass here runs without a KV cache, on windows of at most the model's context length.

- `token_logprobs`: log p(token | the tokens before it) for every token, with the top-k
  alternatives at each position.
- `perplexity`: the strided sliding-window method of the transformers guide "Perplexity
  of fixed-length models" (https://huggingface.co/docs/transformers/perplexity),
  reproduced to the letter, including its weighting of each window's mean loss.
- `embed`: the residual stream after any layer (numbered like HF `hidden_states`:
  0 = embeddings, i = after block i, the last = final-normed), pooled or per token,
  batched with right padding (padding sits at later positions, which the causal mask
  already hides from every real token).

B = batch, T = time, C = channels, V = vocabulary.
"""

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.errors import PocketLMError

POOLS = ("mean", "last", "none")
Progress = Callable[[int, int], None]  # (windows done, windows in all)
_CHUNK = 512  # positions per log-softmax slice: keeps a (T, V) float copy out of memory


@dataclass
class TokenScore:
    """One token of a text and how likely the model found it."""

    token: int
    logprob: float | None  # None for the first token: nothing came before it
    top: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob), most likely first


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # the average negative log-likelihood per scored token (nats)
    tokens: int  # tokens in the text
    scored: int  # tokens the recipe counts (its n_tokens)
    windows: int
    context: int
    stride: int


@dataclass
class Embeddings:
    """One vector per input: (C,) when pooled, (T, C) per token with pool="none";
    float32 on the CPU."""

    vectors: list[torch.Tensor]
    layer: int  # the layer used, counted from 0 (a negative request resolved)
    pool: str
    tokens: list[int]  # token count of each input


# -- windows ------------------------------------------------------------------------------


@dataclass
class _Window:
    begin: int  # first token fed to the model
    end: int  # one past the last token fed
    targets: int  # the recipe's trg_len: tokens at the end of the window not scored before


def _windows(n: int, *, context: int, stride: int) -> list[_Window]:
    """The transformers guide's loop: windows of `context` tokens starting every `stride`
    tokens, each scoring only what the previous windows did not, until the text ends."""
    windows, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        windows.append(_Window(begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return windows


def _check_window(model: nn.Module, *, context: int | None, stride: int | None) -> tuple[int, int]:
    limit = model.config.context_length
    context = limit if context is None else context
    if not 2 <= context <= limit:
        raise PocketLMError(
            f"context must be between 2 and the model's context length {limit} (got {context})"
        )
    stride = max(1, context // 2) if stride is None else stride
    if not 1 <= stride <= context:
        raise PocketLMError(f"stride must be between 1 and the context {context} (got {stride})")
    return context, stride


def _check_ids(ids: Sequence[int], *, vocab_size: int, minimum: int = 1) -> None:
    if len(ids) < minimum:
        what = "is empty" if not ids else f"has {len(ids)} token; it needs at least {minimum}"
        raise PocketLMError(f"the text {what}: give some text to score")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise PocketLMError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")


def _logits(model: nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """Logits (T, V) of one window, no cache."""
    device = next(model.parameters()).device
    tokens = torch.tensor([list(ids)], device=device)  # (1, T)
    positions = torch.arange(len(ids), device=device)[None]  # (1, T)
    with torch.inference_mode():
        return model(tokens, positions)[0]


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, top_k: int = 0) -> Iterator:
    """(logprob of each target (N,), top-k (values, ids) or None) per slice of positions,
    where logits (N, V) at row j predict targets[j]. Float32 log-softmax, sliced."""
    for rows, want in zip(logits.split(_CHUNK), targets.split(_CHUNK), strict=True):
        logp = torch.log_softmax(rows.float(), dim=-1)  # (n, V)
        picked = logp.gather(-1, want[:, None])[:, 0]  # (n,)
        yield picked, (logp.topk(top_k, dim=-1) if top_k else None)


# -- log-probabilities and perplexity ----------------------------------------------------


def token_logprobs(
    model: nn.Module,
    ids: Sequence[int],
    *,
    top_k: int = 0,
    context: int | None = None,
) -> list[TokenScore]:
    """log p(ids[i] | ids[:i]) for every token (the first has none), with the `top_k`
    most likely tokens at each position. A text longer than `context` (default: the
    model's) is scored in sliding windows half a context apart, so every token still
    sees at least half a context of text before it."""
    vocab = model.config.vocab_size
    _check_ids(ids, vocab_size=vocab)
    if not 0 <= top_k <= vocab:
        raise PocketLMError(
            f"top_k must be between 0 and the vocabulary size {vocab} (got {top_k})"
        )
    context, stride = _check_window(model, context=context, stride=None)
    scores = [TokenScore(ids[0], None)]
    device = next(model.parameters()).device
    for w in _windows(len(ids), context=context, stride=stride):
        logits = _logits(model, ids[w.begin : w.end])
        # The stride is under the context, so each window's first target has text before it.
        first = max(1, w.end - w.targets)
        rows = logits[first - 1 - w.begin : w.end - 1 - w.begin]  # row j predicts token j + 1
        targets = torch.tensor(ids[first : w.end], device=device)
        for picked, top in _target_logprobs(rows, targets, top_k=top_k):
            alternatives: list[list] = [[] for _ in range(len(picked))]
            if top is not None:
                values, top_ids = top[0].tolist(), top[1].tolist()
                alternatives = [
                    list(zip(i, v, strict=True)) for i, v in zip(top_ids, values, strict=True)
                ]
            for value, alt in zip(picked.tolist(), alternatives, strict=True):
                pos = len(scores)
                scores.append(TokenScore(ids[pos], value, alt))
    return scores


def perplexity(
    model: nn.Module,
    ids: Sequence[int],
    *,
    context: int | None = None,
    stride: int | None = None,
    progress: Progress | None = None,
) -> PerplexityResult:
    """Perplexity by the transformers guide's strided sliding window: each window of
    `context` tokens (default: the model's) labels only its last `trg_len` tokens (those
    after the previous window's end), its mean loss is weighted by `trg_len - 1` as the
    guide does, and exp(sum / count) is the perplexity. `stride` defaults to half the
    context. `progress(done, total)` is called before the first window and after each."""
    _check_ids(ids, vocab_size=model.config.vocab_size, minimum=2)
    context, stride = _check_window(model, context=context, stride=stride)
    windows = _windows(len(ids), context=context, stride=stride)
    device = next(model.parameters()).device
    nll_sum, n_tokens = 0.0, 0
    if progress is not None:
        progress(0, len(windows))
    for done, w in enumerate(windows, 1):
        logits = _logits(model, ids[w.begin : w.end])
        # HF's loss shifts labels left by one, so position 0 of a window is never a target.
        first = max(w.begin + 1, w.end - w.targets)
        rows = logits[first - 1 - w.begin : w.end - 1 - w.begin]
        targets = torch.tensor(ids[first : w.end], device=device)
        picked = torch.cat([p for p, _ in _target_logprobs(rows, targets)])
        window_loss = -picked.double().mean().item()  # CrossEntropyLoss(reduction="mean")
        # The guide weights it by (valid labels - batch size), even when every label counted.
        num_loss_tokens = w.targets - 1
        nll_sum += window_loss * num_loss_tokens
        n_tokens += num_loss_tokens
        if progress is not None:
            progress(done, len(windows))
    if n_tokens == 0:
        raise PocketLMError(
            "the text is too short to measure: it needs at least 2 tokens per window"
        )
    nll = nll_sum / n_tokens
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        tokens=len(ids),
        scored=n_tokens,
        windows=len(windows),
        context=context,
        stride=stride,
    )


# -- hidden states and embeddings --------------------------------------------------------


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
        _check_ids(ids, vocab_size=vocab)
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
