"""Sampling: pure functions from next-token logits to a token id.

Every function takes logits shaped (V,) or (B, V) (V = vocabulary, B = batch rows that
share one `SamplingParams`), works along the last dimension and returns a new tensor; a
filter that is switched off returns its input untouched, so disabled options cost nothing.
Filtered entries become -inf. Nothing here knows about models, tokenizers or text.

`process_logits` composes the steps in the order Hugging Face and vLLM use: logit bias,
repetition penalty, presence/frequency penalties, temperature, top-k, top-p, min-p.
Semantics follow the references:
  - repetition penalty: CTRL (Keskar et al. 2019) as in HF `RepetitionPenaltyLogitsProcessor`:
    a seen token's positive logit is divided by the penalty, a negative one multiplied;
  - presence/frequency penalties and logit bias: the OpenAI API reference
    (`logit - count * frequency - (count > 0) * presence`);
  - top-k / top-p / min-p: HF `TopKLogitsWarper` / `TopPLogitsWarper` / `MinPLogitsWarper`,
    except that tokens tied on the same logit are kept or dropped together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from pocketlm.errors import PocketLMError

# Slack for float32 rounding at an exact boundary (probs [0.5, 0.3, ...] with top_p 0.8):
# mass within _MASS_SLACK of top_p counts as reaching it, and a log-probability ratio within
# _LOG_SLACK of log(min_p) counts as meeting it, so rounding never flips a hand-computable case.
_MASS_SLACK = 1e-6
_LOG_SLACK = 1e-5
# top_p looks at this many of the most likely tokens first and widens only when their mass
# falls short: a full sort of a 50k vocabulary costs ~3 ms on a laptop CPU, top-64 ~0.06 ms.
_TOP_P_FIRST_LOOK = 64


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into a token. The defaults sample from the model unchanged."""

    temperature: float = 1.0  # 0 => greedy (argmax)
    top_k: int = 0  # 0 => off
    top_p: float = 1.0  # in (0, 1]; 1 => off
    min_p: float = 0.0  # in [0, 1]; 0 => off
    repetition_penalty: float = 1.0  # > 0; 1 => off
    presence_penalty: float = 0.0  # in [-2, 2]
    frequency_penalty: float = 0.0  # in [-2, 2]
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> [-100, 100]
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax: temperature 0."""
        return self.temperature == 0

    def validate(self, *, vocab_size: int) -> None:
        """Raise `PocketLMError` naming the first out-of-range option."""
        _check(
            _is_number(self.temperature) and self.temperature >= 0,
            f"temperature must be >= 0 (got {self.temperature!r})",
        )
        _check(
            _is_int(self.top_k) and self.top_k >= 0,
            f"top_k must be an integer >= 0, 0 to switch it off (got {self.top_k!r})",
        )
        _check(
            _is_number(self.top_p) and 0 < self.top_p <= 1,
            f"top_p must be in (0, 1] (got {self.top_p!r})",
        )
        _check(
            _is_number(self.min_p) and 0 <= self.min_p <= 1,
            f"min_p must be in [0, 1] (got {self.min_p!r})",
        )
        _check(
            _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty must be > 0, 1 to switch it off (got {self.repetition_penalty!r})",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(
                _is_number(value) and -2 <= value <= 2, f"{name} must be in [-2, 2] (got {value!r})"
            )
        for token, bias in self.logit_bias.items():
            _check(
                _is_int(token) and 0 <= token < vocab_size,
                f"logit_bias token id {token!r} is out of range: use ids 0..{vocab_size - 1}",
            )
            _check(
                _is_number(bias) and -100 <= bias <= 100,
                f"logit_bias for token {token} must be in [-100, 100] (got {bias!r})",
            )
        _check(
            self.seed is None or _is_int(self.seed), f"seed must be an integer (got {self.seed!r})"
        )


class SamplingError(PocketLMError):
    """The logits have no distribution to draw from (NaN, or every token filtered out)."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PocketLMError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    # NaN and inf fail every range check, so reject them here with the same message.
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def apply_logit_bias(logits: torch.Tensor, bias: Mapping[int, float]) -> torch.Tensor:
    """Add `bias[token]` to each listed token's logit (OpenAI `logit_bias`)."""
    if not bias:
        return logits
    ids = torch.tensor(list(bias.keys()), dtype=torch.long, device=logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    out = logits.clone()
    out[..., ids] += values
    return out


def _penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    # Only the few seen entries are touched: a where() over all V logits on their sign runs
    # ~3x slower on CPU, as the random sign pattern defeats branch prediction.
    where = seen.nonzero(as_tuple=True)
    scores = logits[where]
    out = logits.clone()
    # Dividing a positive logit and multiplying a negative one both make the token less likely.
    # An extreme penalty (1e-37; 5e-324 is 0 in float32; 1e308) would overflow to +-inf
    # (0/0 to NaN), and a +inf logit turns the softmax into NaN: clamp to the largest
    # finite values instead (a zero logit stays 0), which orders the tokens as the
    # penalty's limit does (a +inf token always chosen, a -inf one never).
    big = torch.finfo(out.dtype).max
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    out[where] = penalised.nan_to_num(nan=0.0).clamp(-big, big)
    return out


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI penalties: `logit - count * frequency - (count > 0) * presence` per token."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = counts.to(logits.dtype)
    out = logits
    if frequency != 0.0:
        out = out - frequency * counts
    if presence != 0.0:
        out = out - presence * (counts > 0).to(logits.dtype)
    return out


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature (> 0); temperature 0 is greedy and never reaches here."""
    if temperature <= 0:
        raise ValueError(f"temperature {temperature} must be > 0 here; 0 means greedy argmax")
    if temperature == 1.0:
        return logits
    out = logits / temperature
    if temperature < 1.0 and not torch.equal(out.isfinite(), logits.isfinite()):
        # A tiny temperature (1e-37; 5e-324 is 0 in float32) overflows the top logits to
        # +inf, and a softmax over +inf is NaN. Shifted by the top logit first, the top
        # stays 0 (0/0 made 0) and the rest go towards -inf: the distribution is the
        # temperature's limit (greedy, ties shared).
        shifted = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
        out = shifted.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf)
    return out


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` largest logits (and any tied with the k-th); 0 => off."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus: keep the most likely tokens until their mass reaches `top_p`; 1 => off.

    The top token is always kept. A token is kept when the mass of the tokens strictly more
    likely than it is below `top_p`, which keeps ties together (HF may split a tie).
    """
    if top_p >= 1.0:
        return logits
    # Work in logit space so that tied logits stay exactly tied; mass is exp(logit - lse).
    lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)  # (..., 1)
    vocab = logits.shape[-1]
    look = min(_TOP_P_FIRST_LOOK, vocab)
    while True:
        head = torch.topk(logits, look, dim=-1).values  # (..., look), descending
        mass = (head.float() - lse).exp()
        before = mass.cumsum(dim=-1) - mass  # mass of the tokens ahead of each one
        n_keep = (before < top_p - _MASS_SLACK).sum(dim=-1, keepdim=True).clamp_(min=1)
        if look == vocab or bool((n_keep < look).all()):
            break
        look = min(look * 4, vocab)  # the nucleus may go past this head: widen and retry
    smallest_kept = head.gather(-1, n_keep - 1)  # (..., 1)
    return logits.masked_fill(logits < smallest_kept, -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least `min_p` times the top one's; 0 => off."""
    if min_p <= 0.0:
        return logits
    # p_i >= min_p * p_max  <=>  logit_i - logit_max >= log(min_p): no softmax needed.
    top = logits.amax(dim=-1, keepdim=True)  # (..., 1)
    floor = top + (math.log(min_p) - _LOG_SLACK)
    return logits.masked_fill(logits < floor, -math.inf)


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    counts: torch.Tensor | None,
    prompt_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply every enabled step of `params`, in HF/vLLM order, to one step's logits.

    `counts` (same shape as logits, any numeric dtype) says how often each token has been
    generated so far; None means nothing yet. The repetition penalty applies to tokens
    with a count, plus those set in the optional bool `prompt_mask` (HF and vLLM also
    penalise prompt tokens; presence/frequency count generated tokens only). For greedy
    params only bias and penalties run: temperature and the filters cannot move the argmax.
    """
    out = apply_logit_bias(logits, params.logit_bias)
    if params.repetition_penalty != 1.0:
        seen = _seen_mask(counts, prompt_mask)
        if seen is not None:
            out = _penalise(out, seen, params.repetition_penalty)
    if counts is not None:
        out = apply_presence_frequency(
            out, counts, params.presence_penalty, params.frequency_penalty
        )
    if params.greedy:
        return out
    out = apply_temperature(out, params.temperature)
    out = top_k_filter(out, params.top_k)
    out = top_p_filter(out, params.top_p)
    return min_p_filter(out, params.min_p)


def _seen_mask(
    counts: torch.Tensor | None, prompt_mask: torch.Tensor | None
) -> torch.Tensor | None:
    if counts is None:
        return prompt_mask
    seen = counts > 0
    return seen if prompt_mask is None else seen | prompt_mask


def sample(
    logits: torch.Tensor, params: SamplingParams, *, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw one token id per row from processed logits: () for (V,), (B,) for (B, V).

    Greedy params take the argmax. Otherwise this is inverse-CDF sampling from the softmax,
    one uniform number per row from `generator` (None: torch's global RNG); it draws from
    the same distribution as `torch.multinomial` at a fraction of the cost on CPU.
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    cdf = probs.cumsum(dim=-1)  # (..., V)
    total = cdf[..., -1]
    if not bool(((total > 0) & total.isfinite()).all()):
        # NaN logits (a model that overflowed) or no token left: there is nothing to draw
        # from, and searchsorted would answer V, one past the vocabulary.
        raise SamplingError("the logits give no finite distribution to sample from (NaN/inf)")
    uniform = torch.rand(
        (*cdf.shape[:-1], 1), generator=generator, device=cdf.device, dtype=cdf.dtype
    )
    # u in (0, total]: the first index with cdf >= u then always has probability > 0,
    # so a filtered (-inf) token can never be drawn, even at the ends of the range.
    u = (1.0 - uniform) * cdf[..., -1:]
    return torch.searchsorted(cdf, u).squeeze(-1)


def prompt_mask(
    params: SamplingParams,
    prompt_ids: Sequence[int],
    *,
    vocab_size: int,
    device: torch.device | str,
) -> torch.Tensor | None:
    """The bool (V,) mask of prompt tokens that the repetition penalty treats as seen (HF
    and vLLM penalise prompt tokens too); None when the penalty is off."""
    if params.repetition_penalty == 1.0:
        return None
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[torch.tensor(list(prompt_ids), dtype=torch.long, device=device)] = True
    return mask


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with `seed` (any Python int, e.g. negative) on `device`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator
