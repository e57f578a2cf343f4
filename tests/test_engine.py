"""The engine core's promises, on a tiny random GPT-2: streams of one LM are independent
(interleaved or from two threads, each gives its solo tokens), a session that holds a cache
refuses a second open stream, options fail at the call, statistics come back with the
result, and one request gives the same tokens through `lm.generate`, the server's
scheduler alone and under load (the same Sampler and TextStream run in both)."""

import threading

import pytest

import pocketlm
from checkpoints import make_gpt2
from pocketlm.errors import PocketLMError
from pocketlm.generate.params import GenerationParams
from pocketlm.sampling import SamplingParams
from pocketlm.serve.scheduler import Request, Scheduler

SAMPLED = dict(max_tokens=24, temperature=1.0, top_k=40, seed=11)
PROMPTS = ["Alice was beginning to", "The capital of France is", "Once upon a time"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return pocketlm.load(str(make_gpt2(tmp_path_factory.mktemp("tiny"), n_positions=128)))


def tokens(chunks):
    return [c.token for c in chunks if c.token is not None]


def test_two_interleaved_streams_give_their_solo_tokens(lm):
    solo = [lm.generate(p, **SAMPLED).tokens for p in PROMPTS[:2]]
    greedy = lm.generate(PROMPTS[2], max_tokens=24, temperature=0).tokens
    a = lm.stream(PROMPTS[0], **SAMPLED)
    b = lm.stream(PROMPTS[1], **SAMPLED)
    c = lm.stream(PROMPTS[2], max_tokens=24, temperature=0)
    pairs = list(zip(a, b, c, strict=True))  # one chunk of each in turn
    assert [tokens(column) for column in zip(*pairs, strict=True)] == [*solo, greedy]
    assert solo[0] != solo[1]


def test_two_threads_streaming_on_one_lm_give_their_solo_tokens(lm):
    solo = {p: lm.generate(p, **SAMPLED).tokens for p in PROMPTS}
    got: dict[str, list[int]] = {}
    start = threading.Barrier(len(PROMPTS))

    def work(prompt: str) -> None:
        start.wait()
        for _ in range(3):  # a few rounds, so the threads really overlap
            got[prompt] = tokens(lm.stream(prompt, **SAMPLED))

    threads = [threading.Thread(target=work, args=(p,)) for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert got == solo


def test_a_session_refuses_a_second_open_stream_and_then_goes_on(lm):
    session = lm.session()
    first = session.stream(PROMPTS[0], max_tokens=8, temperature=0)
    next(first)
    second = session.stream(PROMPTS[1], max_tokens=8, temperature=0)  # checked, not started
    with pytest.raises(PocketLMError, match="already generating"):
        next(second)
    first.close()  # closing the first frees the session
    assert tokens(session.stream(PROMPTS[1], max_tokens=8, temperature=0)) == (
        lm.generate(PROMPTS[1], max_tokens=8, temperature=0).tokens
    )


def test_a_session_reuses_its_cache_and_a_bare_stream_does_not(lm):
    session = lm.session()
    ids = lm.tokenizer.encode(PROMPTS[0])
    first = session.generate(ids, max_tokens=4, temperature=0)
    longer = ids + first.tokens + lm.tokenizer.encode(" and")
    again = session.generate(longer, max_tokens=4, temperature=0)
    # Only what follows the text already in the cache is computed.
    assert again.stats.prefilled_tokens == len(longer) - len(ids) - len(first.tokens) + 1
    assert lm.generate(longer, max_tokens=4, temperature=0).stats.prefilled_tokens == len(longer)
    assert again.tokens == lm.generate(longer, max_tokens=4, temperature=0).tokens


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(tempurature=3), "unknown option 'tempurature'; did you mean 'temperature'"),
        (dict(max_token=3), "did you mean 'max_tokens'"),
        (dict(temperature=-1), "temperature must be >= 0"),
        (dict(max_tokens=0), "max_tokens must be at least 1"),
    ],
)
def test_options_fail_at_the_call_not_at_the_first_token(lm, options, message):
    with pytest.raises(PocketLMError, match=message):
        lm.stream("x", **options)  # no next(): the call itself refuses
    with pytest.raises(PocketLMError, match=message):
        lm.session().stream("x", **options)


def test_statistics_come_back_with_the_result(lm):
    chunks = list(lm.stream(PROMPTS[0], max_tokens=5, temperature=0))
    assert [c.stats is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    stats = chunks[-1].stats
    assert stats.new_tokens == 5 and stats.prompt_tokens == len(lm.tokenizer.encode(PROMPTS[0]))
    out = lm.generate(PROMPTS[0], max_tokens=5, temperature=0)
    assert out.stats.new_tokens == 5 and out.usage.completion_tokens == 5
    assert not hasattr(lm, "last_stats")


def test_unseeded_requests_draw_from_their_own_streams(lm):
    a, b = (lm.generate(PROMPTS[0], max_tokens=24, temperature=1.0).tokens for _ in range(2))
    assert a != b  # own random streams; equal only by a chance of about 1e-30


def test_the_same_request_through_the_api_the_scheduler_alone_and_under_load(lm):
    """A seeded sampled request with penalties and logprobs: the same tokens, text and
    log-probabilities through `lm.generate` and the server's scheduler, alone and in a
    batch with other requests coming and going."""
    options = dict(SAMPLED, frequency_penalty=0.5, repetition_penalty=1.2, stop=["zzz"])
    params = lm.params(**options, logprobs=2)
    want = lm.generate(PROMPTS[0], **options, logprobs=2)
    ids = lm.tokenizer.encode(PROMPTS[0])
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=4, max_queue=16)
    scheduler.start()
    try:
        alone = _served(scheduler, ids, params)
        crowd = [
            Request(
                lm.tokenizer.encode(p),
                GenerationParams(SamplingParams(temperature=1.5), max_tokens=3 + i),
                emit=lambda event: None,
            )
            for i, p in enumerate(PROMPTS * 2)
        ]
        scheduler.submit(crowd[:3])
        loaded = _served(scheduler, ids, params, before=crowd[3:])
    finally:
        scheduler.stop()
    for events in (alone, loaded):
        assert [e.token for e in events if e.token is not None] == want.tokens
        assert "".join(e.text for e in events) == want.text
        assert [e.logprob for e in events if e.token is not None] == pytest.approx(
            want.logprobs, abs=1e-4
        )
        assert events[-1].finish_reason == want.finish_reason


def _served(scheduler, ids, params, *, before=()):
    events, done = [], threading.Event()

    def emit(event):
        events.append(event)
        if event.finish_reason is not None:
            done.set()

    scheduler.submit([*before, Request(list(ids), params, emit=emit)])
    assert done.wait(60)
    return events
