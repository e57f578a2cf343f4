"""Speculative decoding: a small draft model proposes, the target model verifies.

Each round the draft proposes `lookahead` tokens one by one; the target reads them all in
one forward pass (one weight read for several tokens: decoding is bound by that read) and
keeps the longest prefix it agrees with, plus one token of its own. The output has the
target's distribution exactly (Leviathan et al. 2023, arXiv:2211.17192, Algorithm 1;
Chen et al. 2023, arXiv:2302.01318): a proposal x drawn from the draft's q is kept with
probability min(1, p(x) / q(x)); on rejection the token is drawn from norm(max(0, p - q)).
Greedy is the limit of that rule: keep x while it is the target's argmax, so greedy output
is the target's own greedy output token for token.

Penalties and biases are applied per position with the counts as they stand at that
position, so every sampling option keeps its meaning. A constrained request's grammar
masks the draft's proposals and the target's rows alike, each at the position it stands
for (the state walks through the proposals, then rolls back to verify them), so p and q
are both the masked distributions and the output is the target's constrained one. Knows nothing of text or HTTP;
both models must share a tokenizer (the caller checks).
"""

import time
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as Seq

import torch

from pocketlm.errors import PocketLMError
from pocketlm.generate import LOOKAHEAD
from pocketlm.generate.params import GenerationParams
from pocketlm.generate.request import Sampler, Stats, Step
from pocketlm.generate.sequence import Sequence
from pocketlm.tokenizer import Tokenizer


def check_lookahead(lookahead: int) -> None:
    if lookahead < 1:
        raise PocketLMError(f"lookahead must be at least 1 (got {lookahead})")


def speculative_tokens(
    target: Sequence,
    draft: Sequence,
    prompt_ids: Seq[int],
    params: GenerationParams,
    *,
    eos_ids: Iterable[int] = (),
    stats: Stats | None = None,
    lookahead: int = LOOKAHEAD,
    tokenizer: Tokenizer | None = None,
) -> Iterator[Step]:
    """Like `generate_tokens`, with `draft` proposing `lookahead` tokens per round."""
    stats = stats if stats is not None else Stats()
    stats.prompt_tokens = len(prompt_ids)
    eos, max_tokens = frozenset(eos_ids), params.max_tokens
    sampler = Sampler(
        params,
        prompt_ids,
        vocab_size=target.vocab_size,
        device=target.device,
        tokenizer=tokenizer,
    )
    started = time.perf_counter()
    first = target.prefill(prompt_ids)[None]  # (1, V): the first token's distribution
    stats.prefilled_tokens = target.last_prefill_size
    text = list(prompt_ids)  # prompt + generated so far
    pending: int | None = None  # generated, not yet in the target's cache
    context = min(target.context_length, draft.context_length)
    while True:
        room = context - len(text) - 1  # leave a slot for the target's own token
        k = max(0, min(lookahead, max_tokens - stats.new_tokens - 1, room))
        proposals, q_rows = _propose(draft, text, k, sampler=sampler)
        if pending is None:
            rows = torch.cat([first, target.extend(proposals)]) if proposals else first
        elif len(text) > target.context_length:  # window full: `step` slides it
            rows = target.step(pending)[None]
        else:
            rows = target.extend([pending, *proposals])  # (1 + k, V)
        stats.draft_proposed += len(proposals)
        for i, row in enumerate(rows):
            token, agreed = _verify(sampler.filter(row), q_rows, proposals, i, sampler=sampler)
            stats.draft_accepted += agreed
            sampler.accept(token)
            stats.record_token(started)
            step = sampler.describe(row, token)
            yield step
            if token in eos or step.final or stats.new_tokens >= max_tokens:
                return
            text.append(token)
            if not agreed:
                break
        # The target's cache keeps the proposals it agreed with; its own token is pending.
        target.truncate(len(text) - 1)
        pending = text[-1]


def _propose(
    draft: Sequence, text: list[int], k: int, *, sampler: Sampler
) -> tuple[list[int], list[torch.Tensor]]:
    """k tokens from the draft after `text`, with the processed logits each came from
    (penalised with the counts as they would stand at each position)."""
    if k == 0:
        return [], []
    logits = draft.prefill(text)  # computes only what the draft's cache lacks
    counts = sampler.counts.clone()
    grammar = sampler.grammar
    proposals, rows = [], []
    for i in range(k):
        filtered = sampler.filter(logits, counts=counts)  # masked where the grammar stands
        token = sampler.draw(filtered)
        proposals.append(token)
        rows.append(filtered)
        counts[token] += 1
        if grammar is not None:
            grammar.accept(token)
            if grammar.done:  # nothing but end-of-text may follow: propose no further
                break
        if i < k - 1:
            logits = draft.step(token)
    if grammar is not None:
        grammar.rollback(len(proposals))  # the verifier walks them again
    return proposals, rows


def _verify(
    p_logits: torch.Tensor,
    q_rows: list[torch.Tensor],
    proposals: list[int],
    i: int,
    *,
    sampler: Sampler,
) -> tuple[int, bool]:
    """(token at position i, whether it is the draft's proposal)."""
    if i >= len(proposals):  # every proposal kept: one more token from the target
        return sampler.draw(p_logits), False
    x, rng = proposals[i], sampler.generator
    if sampler.params.greedy:
        best = int(p_logits.argmax())
        return best, best == x
    p = torch.softmax(p_logits, dim=-1, dtype=torch.float32)
    q = torch.softmax(q_rows[i], dim=-1, dtype=torch.float32)
    u = torch.rand((), generator=rng, device=p.device)
    if float(u) * float(q[x]) < float(p[x]):  # u < p(x) / q(x), with q(x) > 0
        return x, True
    residual = (p - q).clamp(min=0)
    if float(residual.sum()) <= 0:  # p == q up to rounding: nothing to correct
        residual = p
    return int(torch.multinomial(residual, 1, generator=rng)), False


def check_draft(target: Tokenizer, draft: Tokenizer, *, names: tuple[str, str]) -> None:
    """Refuse a draft whose tokens mean something else than the target's (one-line error)."""
    same = target.vocab_size == draft.vocab_size and all(
        target.token_bytes(i) == draft.token_bytes(i) for i in range(target.vocab_size)
    )
    if not same:
        raise PocketLMError(
            f"draft model {names[1]} does not share {names[0]}'s tokenizer; speculative "
            "decoding needs a smaller model of the same family (gpt2 for gpt2-xl, ...)"
        )
