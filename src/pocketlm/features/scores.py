"""Token log-probabilities and perplexity: pure functions of (model, token ids).

- `token_logprobs`: log p(token | the tokens before it) for every token, with the top-k
  alternatives at each position.
- `perplexity`: the strided sliding-window method of the transformers guide "Perplexity
  of fixed-length models" (https://huggingface.co/docs/transformers/perplexity),
  reproduced to the letter, including its weighting of each window's mean loss.

Knows nothing of text, files, the terminal or HTTP. B = batch, T = time, V = vocabulary.
"""

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pocketlm.errors import PocketLMError

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


def check_ids(ids: Sequence[int], *, vocab_size: int, minimum: int = 1) -> None:
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
    check_ids(ids, vocab_size=vocab)
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
    check_ids(ids, vocab_size=model.config.vocab_size, minimum=2)
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
