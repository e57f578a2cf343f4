"""Sampling: exact results on hand-built distributions, and `transformers` as an oracle."""

import math

import pytest
import torch

from pocketlm.errors import PocketLMError
from pocketlm.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_presence_frequency,
    apply_temperature,
    make_generator,
    min_p_filter,
    process_logits,
    prompt_mask,
    sample,
    top_k_filter,
    top_p_filter,
)

INF = math.inf
PROBS = [0.5, 0.3, 0.15, 0.05]


def logits_of(probs, *, shift=0.0):
    return torch.tensor(probs, dtype=torch.float32).log() + shift


def kept(logits):
    """Indices that survived a filter, as a list (rows as a list of lists)."""
    mask = torch.isfinite(logits)
    if mask.dim() == 1:
        return mask.nonzero().flatten().tolist()
    return [row.nonzero().flatten().tolist() for row in mask]


# --- filters -------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "expected"), [(1, [0]), (2, [0, 1]), (3, [0, 1, 2])])
def test_top_k_keeps_the_k_largest(k, expected):
    logits = logits_of(PROBS)
    out = top_k_filter(logits, k)
    assert kept(out) == expected
    assert torch.equal(out[expected], logits[expected])  # survivors untouched


def test_top_k_off_or_too_big_returns_input_itself():
    logits = logits_of(PROBS)
    assert top_k_filter(logits, 0) is logits
    assert top_k_filter(logits, 4) is logits
    assert top_k_filter(logits, 99) is logits


def test_top_k_keeps_ties_with_the_kth_like_hf():
    assert kept(top_k_filter(logits_of([0.4, 0.3, 0.3]), 2)) == [0, 1, 2]


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.8, [0, 1]),  # 0.5 + 0.3 reaches 0.8 exactly: the smallest such set
        (0.81, [0, 1, 2]),
        (0.95, [0, 1, 2]),
        (0.96, [0, 1, 2, 3]),
        (0.5, [0]),
        (0.3, [0]),
        (1e-9, [0]),  # the top token is always kept
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(top_p_filter(logits_of(PROBS), p)) == expected
    assert kept(top_p_filter(logits_of(PROBS, shift=7.25), p)) == expected  # shift-invariant


def test_top_p_works_in_any_token_order_and_per_row():
    logits = logits_of([[0.05, 0.3, 0.5, 0.15], [0.15, 0.05, 0.3, 0.5]])
    assert kept(top_p_filter(logits, 0.8)) == [[1, 2], [2, 3]]


def test_top_p_off_returns_input_itself():
    logits = logits_of(PROBS)
    assert top_p_filter(logits, 1.0) is logits


def test_top_p_keeps_ties_together():
    # 0.4 alone falls short of 0.5, so the next token is needed; its tie comes with it.
    assert kept(top_p_filter(logits_of([0.4, 0.2, 0.2, 0.2]), 0.5)) == [0, 1, 2, 3]


def test_top_p_on_a_large_vocabulary_matches_a_full_sort():
    # A flat-ish distribution puts the nucleus past the first look at the head.
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5000, generator=gen) * 0.5
    for p in (0.1, 0.5, 0.9, 0.999):
        probs = torch.softmax(logits.double(), dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        expected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < p)
        assert torch.equal(torch.isfinite(top_p_filter(logits, p)), expected)
        assert expected.sum(-1).min() > 64


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [(0.5, [0, 1]), (0.3, [0, 1, 2]), (0.1, [0, 1, 2, 3]), (1.0, [0]), (0.51, [0])],
)
def test_min_p_keeps_probs_at_least_min_p_times_the_top(min_p, expected):
    # probs 0.5, 0.25, 0.15, 0.1: min_p 0.5 keeps probs >= 0.25
    probs = [0.5, 0.25, 0.15, 0.1]
    assert kept(min_p_filter(logits_of(probs), min_p)) == expected
    # Shifted logits lose the exact ratio to float32 rounding: still the same answer.
    for shift in (-3.5, 8.88, 20.0):
        assert kept(min_p_filter(logits_of(probs, shift=shift), min_p)) == expected


def test_min_p_off_returns_input_itself():
    logits = logits_of(PROBS)
    assert min_p_filter(logits, 0.0) is logits


# --- arithmetic steps ----------------------------------------------------------------------


def test_temperature_divides_and_one_is_a_no_op():
    logits = torch.tensor([2.0, -1.0, 0.5])
    assert torch.equal(apply_temperature(logits, 0.5), torch.tensor([4.0, -2.0, 1.0]))
    assert apply_temperature(logits, 1.0) is logits
    with pytest.raises(ValueError):
        apply_temperature(logits, 0.0)


def test_logit_bias_adds_per_token_without_mutating():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    before = logits.clone()
    out = apply_logit_bias(logits, {0: -100.0, 2: 1.5})
    assert torch.equal(out, torch.tensor([[-99.0, 2.0, 4.5], [-100.0, 0.0, 1.5]]))
    assert torch.equal(logits, before)
    assert apply_logit_bias(logits, {}) is logits


def penalised(logits, penalty, *, counts=None, prompt=None):
    """Only the penalty: greedy params stop before temperature and the filters."""
    params = SamplingParams(temperature=0, repetition_penalty=penalty)
    return process_logits(logits, params, counts=counts, prompt_mask=prompt)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, 0.0])
    counts = torch.tensor([1, 2, 0, 0, 1])  # generated; a repeat counts once
    out = penalised(logits, 2.0, counts=counts)
    assert torch.equal(out, torch.tensor([1.0, -4.0, 1.0, 0.5, 0.0]))
    assert torch.equal(logits, torch.tensor([2.0, -2.0, 1.0, 0.5, 0.0]))
    assert penalised(logits, 1.0, counts=counts) is logits
    # Prompt tokens count as seen too (HF, vLLM), through the prompt mask.
    mask = prompt_mask(SamplingParams(repetition_penalty=2.0), [2, 2], vocab_size=5, device="cpu")
    out = penalised(logits, 2.0, counts=torch.zeros(5), prompt=mask)
    assert torch.equal(out, torch.tensor([2.0, -2.0, 0.5, 0.5, 0.0]))


def test_repetition_penalty_per_row():
    logits = torch.tensor([[3.0, 3.0], [-3.0, -3.0]])
    out = penalised(logits, 1.5, counts=torch.tensor([[1, 0], [0, 1]]))
    assert torch.equal(out, torch.tensor([[2.0, 3.0], [-3.0, -4.5]]))


def test_presence_and_frequency_follow_openai():
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    counts = torch.tensor([0, 1, 3, 0])
    out = apply_presence_frequency(logits, counts, 0.5, 0.25)
    # 1 - count * 0.25 - (count > 0) * 0.5
    assert torch.equal(out, torch.tensor([1.0, 0.25, -0.25, 1.0]))
    out = apply_presence_frequency(logits, counts, -1.0, 0.0)  # negative encourages
    assert torch.equal(out, torch.tensor([1.0, 2.0, 2.0, 1.0]))
    assert apply_presence_frequency(logits, counts, 0.0, 0.0) is logits


def test_process_logits_order_is_bias_then_penalties_then_temperature():
    logits = torch.tensor([1.0, 0.0, 0.0])
    counts = torch.tensor([2, 0, 0])
    params = SamplingParams(
        temperature=2.0, repetition_penalty=2.0, frequency_penalty=0.5, logit_bias={0: -3.0}
    )
    # (1 - 3) = -2 -> * 2 = -4 -> - 2 * 0.5 = -5 -> / 2 = -2.5
    out = process_logits(logits, params, counts=counts)
    assert torch.equal(out, torch.tensor([-2.5, 0.0, 0.0]))


def test_process_logits_prompt_mask_feeds_only_the_repetition_penalty():
    logits = torch.tensor([2.0, 2.0, 2.0])
    prompt = torch.tensor([False, True, False])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0)
    out = process_logits(logits, params, counts=torch.tensor([0, 0, 1]), prompt_mask=prompt)
    assert torch.equal(out, torch.tensor([2.0, 1.0, 0.0]))
    out = process_logits(logits, params, counts=None, prompt_mask=prompt)
    assert torch.equal(out, torch.tensor([2.0, 1.0, 2.0]))


def test_process_logits_defaults_do_nothing_and_never_mutate():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    assert process_logits(logits, SamplingParams(), counts=None) is logits
    params = SamplingParams(
        temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.3,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={3: 2.0},
    )  # fmt: skip
    process_logits(logits, params, counts=torch.ones(2, 50, dtype=torch.long))
    assert torch.equal(logits, before)


def test_process_logits_greedy_skips_the_filters():
    params = SamplingParams(temperature=0.0, top_k=1, logit_bias={1: 5.0})
    out = process_logits(logits_of(PROBS), params, counts=None)
    assert torch.isfinite(out).all()
    assert sample(out, params, generator=None).item() == 1


# --- oracle: transformers' logits processors -----------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=50, top_p=0.9),
        SamplingParams(temperature=1.3, top_p=0.5, repetition_penalty=1.3),
        SamplingParams(temperature=0.9, top_k=20, min_p=0.1, repetition_penalty=0.8),
        SamplingParams(temperature=1.0, top_k=100, top_p=0.95, min_p=0.02),
        SamplingParams(temperature=2.0, min_p=0.2),
        SamplingParams(temperature=0.5, top_p=0.99, repetition_penalty=2.0),
    ],
)
def test_process_logits_matches_transformers(params):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(0)
    batch, vocab = 4, 1000
    logits = torch.randn(batch, vocab, generator=gen) * 3
    input_ids = torch.randint(0, vocab, (batch, 30), generator=gen)
    hf = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.repetition_penalty != 1.0:
        hf.insert(0, RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.top_k:
        hf.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        hf.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0.0:
        hf.append(MinPLogitsWarper(params.min_p))
    expected = hf(input_ids, logits.clone())

    counts = torch.zeros(batch, vocab, dtype=torch.long).scatter_add_(
        1, input_ids, torch.ones_like(input_ids)
    )
    out = process_logits(logits, params, counts=counts)

    finite = torch.isfinite(expected)
    assert 0 < finite.sum() < finite.numel()  # the oracle really filtered something
    assert torch.equal(torch.isfinite(out), finite)
    torch.testing.assert_close(out[finite], expected[finite])


# --- sampling ------------------------------------------------------------------------------


def test_greedy_is_argmax_per_row():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(temperature=0.0)
    assert params.greedy and not SamplingParams().greedy
    assert torch.equal(sample(logits, params, generator=None), logits.argmax(-1))
    assert sample(logits[0], params, generator=None).shape == ()


def test_sample_shapes_and_dtype():
    params = SamplingParams()
    one = sample(logits_of(PROBS), params, generator=make_generator(0))
    rows = sample(logits_of([PROBS] * 3), params, generator=make_generator(0))
    assert one.shape == () and one.dtype == torch.long
    assert rows.shape == (3,) and rows.dtype == torch.long


def draw_100(seed):
    generator = make_generator(seed)
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    return [sample(logits, SamplingParams(), generator=generator).item() for _ in range(100)]


def test_same_seed_same_sequence_different_seed_differs():
    assert draw_100(1234) == draw_100(1234)
    assert draw_100(1234) != draw_100(1235)
    assert draw_100(-5) == draw_100(-5)  # any int is a seed


def test_sampled_frequencies_match_the_distribution():
    n = 40_000
    logits = logits_of([PROBS + [0.0]] * n)  # a zero-probability token is never drawn
    ids = sample(logits, SamplingParams(), generator=make_generator(7))
    freq = torch.bincount(ids, minlength=5).double() / n
    assert freq[4] == 0
    for got, want in zip(freq[:4].tolist(), PROBS, strict=True):
        assert abs(got - want) < 0.01


def test_sample_never_draws_a_filtered_token():
    params = SamplingParams(top_k=2)
    logits = process_logits(logits_of([[0.2, 0.25, 0.25, 0.3]] * 5000), params, counts=None)
    ids = sample(logits, params, generator=make_generator(0))
    assert set(ids.tolist()) == {1, 2, 3}


# --- validation ----------------------------------------------------------------------------


def test_valid_params_pass():
    SamplingParams().validate(vocab_size=10)
    SamplingParams(
        temperature=0, top_k=5, top_p=0.01, min_p=1, repetition_penalty=0.5,
        presence_penalty=-2, frequency_penalty=2, logit_bias={0: -100, 9: 100}, seed=-1,
    ).validate(vocab_size=10)  # fmt: skip


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ({"temperature": -1}, "temperature must be >= 0 (got -1)"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p must be in (0, 1] (got 0.0)"),
        ({"top_p": 1.5}, "top_p must be in (0, 1] (got 1.5)"),
        ({"top_p": math.nan}, "top_p"),
        ({"min_p": -0.1}, "min_p must be in [0, 1]"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty must be in [-2, 2]"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"logit_bias": {10: 1.0}}, "logit_bias token id 10 is out of range: use ids 0..9"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias token id -1"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias token id '5'"),
        ({"logit_bias": {5: 101.0}}, "logit_bias for token 5 must be in [-100, 100]"),
        ({"logit_bias": {5: -math.inf}}, "logit_bias for token 5"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_validate_rejects_each_bad_value_in_one_line(bad, words):
    with pytest.raises(PocketLMError) as info:
        SamplingParams(**bad).validate(vocab_size=10)
    message = str(info.value)
    assert words in message
    assert "\n" not in message
