"""The continuous-batching scheduler on its own (no HTTP): batched requests give the tokens
they give alone, as checked against `transformers` greedy generation and against
`pocketlm.generate` (the B=1 path) with the same seed; rows join and leave between steps;
cancellation, time limits and the queue bound. A tiny random GPT-2 keeps it fast."""

import threading
import time

import pytest
import torch

import pocketlm
from checkpoints import hf_model, make_gpt2
from pocketlm.generate.params import GenerationParams
from pocketlm.sampling import SamplingParams
from pocketlm.serve.scheduler import Event, QueueFull, Request, Scheduler

PROMPTS = [
    [464, 3290],
    [15496, 995, 11],
    [40, 588, 257, 1310, 286],
    [1, 2, 3, 4, 5, 6, 7, 8],
    [818],
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_gpt2(tmp_path_factory.mktemp("tiny"), n_positions=256)


@pytest.fixture(scope="module")
def lm(folder):
    return pocketlm.load(folder)


@pytest.fixture
def scheduler(lm):
    s = Scheduler(lm.model, lm.tokenizer, max_batch=4, max_queue=8)
    s.start()
    yield s
    s.stop()


class Run:
    """A request whose events are collected; `wait()` until its last one."""

    def __init__(self, ids, *, max_tokens, params, stop=(), logprobs=None, **options):
        self.events: list[Event] = []
        self.finished = threading.Event()
        params = GenerationParams(params, max_tokens=max_tokens, stop=stop, logprobs=logprobs)
        self.request = Request(prompt_ids=list(ids), params=params, emit=self._emit, **options)

    def _emit(self, event):
        self.events.append(event)
        if event.finish_reason is not None:
            self.finished.set()

    def wait(self, timeout=30.0):
        assert self.finished.wait(timeout), "the request did not finish"
        return self

    @property
    def tokens(self):
        return [e.token for e in self.events if e.token is not None]

    @property
    def finish(self):
        return self.events[-1].finish_reason


def greedy(**kw):
    return SamplingParams(temperature=0.0, **kw)


def test_batched_greedy_equals_transformers_generate(lm, folder, scheduler):
    theirs = hf_model(folder)
    runs = [Run(ids, max_tokens=12 + 3 * i, params=greedy()) for i, ids in enumerate(PROMPTS)]
    scheduler.submit([r.request for r in runs])  # 5 requests, 4 rows: one waits for a free row
    for ids, run in zip(PROMPTS, runs, strict=True):
        run.wait()
        with torch.no_grad():
            out = theirs.generate(
                torch.tensor([ids]),
                max_new_tokens=run.request.params.max_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert run.tokens == out[0, len(ids) :].tolist()
        assert run.finish == "length"
        assert run.events[-1].completion_tokens == run.request.params.max_tokens
    assert scheduler.snapshot()["active"] == 0


def test_batched_int8_greedy_equals_each_request_alone(folder):
    """int8 weights (pocketlm's kernel where it builds): a batch of rows gives each
    request the tokens it gets alone."""
    lm = pocketlm.load(folder, quantize="int8")
    alone = [lm.generate(ids, max_tokens=12, temperature=0).tokens for ids in PROMPTS]
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=4, max_queue=8)
    scheduler.start()
    try:
        runs = [Run(ids, max_tokens=12, params=greedy()) for ids in PROMPTS]
        scheduler.submit([r.request for r in runs])
        assert [r.wait().tokens for r in runs] == alone
    finally:
        scheduler.stop()


def test_seeded_sampling_does_not_depend_on_batch_mates(lm, scheduler):
    prompts = PROMPTS[:3]
    params = [
        SamplingParams(temperature=1.0, top_k=50, seed=100 + i, frequency_penalty=0.5)
        for i in range(len(prompts))
    ]
    expected = [
        lm.generate(ids, max_tokens=8, **vars(p)).tokens
        for ids, p in zip(prompts, params, strict=True)
    ]
    # Together, and each with different, unseeded company that leaves early.
    runs = [Run(ids, max_tokens=8, params=p) for ids, p in zip(prompts, params, strict=True)]
    noise = [Run(ids, max_tokens=3, params=SamplingParams(temperature=1.5)) for ids in prompts]
    scheduler.submit([r.request for pair in zip(runs, noise, strict=True) for r in pair])
    assert [r.wait().tokens for r in runs] == expected
    assert expected[0] != expected[1]


def test_stop_strings_eos_and_logprobs(lm, scheduler):
    alone = lm.generate(PROMPTS[0], max_tokens=20, temperature=0.0, logprobs=0)
    text = alone.text
    stop = text[5:9]
    run = Run(PROMPTS[0], max_tokens=20, params=greedy(), stop=(stop,), logprobs=3)
    scheduler.submit([run.request])
    run.wait()
    assert "".join(e.text for e in run.events) == text[: text.index(stop)]
    assert run.finish == "stop"
    first = run.events[0]
    assert first.logprob == pytest.approx(alone.logprobs[0], abs=1e-5)
    assert first.top_logprobs[0][0] == first.token  # greedy: the chosen token is the top one
    # EOS forced by logit_bias: the request ends with "stop" and EOS is not a token of the text.
    eos = next(iter(lm.tokenizer.eos_ids))
    run = Run(PROMPTS[1], max_tokens=10, params=greedy(logit_bias={eos: 100.0}))
    scheduler.submit([run.request])
    assert (
        run.wait().finish == "stop" and run.tokens == [] and run.events[-1].completion_tokens == 1
    )


def test_prompt_logprobs_match_a_plain_forward(lm, scheduler):
    ids = PROMPTS[3]
    run = Run(ids, max_tokens=1, params=greedy(), prompt_logprobs=True)
    scheduler.submit([run.request])
    got = run.wait().events[0].prompt_logprobs
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids]), torch.arange(len(ids))[None])[0]
    lp = torch.log_softmax(logits, -1)
    assert got[0] is None
    assert got[1:] == pytest.approx(
        [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)], abs=1e-5
    )


def test_cancel_frees_the_row_and_others_continue(lm, scheduler):
    long = Run(PROMPTS[0], max_tokens=200, params=greedy())
    short = Run(PROMPTS[1], max_tokens=30, params=greedy())
    scheduler.submit([long.request, short.request])
    while len(long.events) < 3:
        time.sleep(0.005)
    scheduler.cancel(long.request)
    long.wait()
    assert long.finish == "cancelled" and len(long.events) < 200
    assert short.wait().tokens == lm.generate(PROMPTS[1], max_tokens=30, temperature=0.0).tokens
    snap = scheduler.snapshot()
    assert snap["cancelled"] == 1 and snap["active"] == 0


def test_queue_bound_and_time_limit(lm):
    s = Scheduler(lm.model, lm.tokenizer, max_batch=1, max_queue=2)  # not started: all wait
    runs = [Run(PROMPTS[0], max_tokens=5, params=greedy(), timeout=0.0) for _ in range(3)]
    s.submit([r.request for r in runs[:2]])
    with pytest.raises(QueueFull):
        s.submit([runs[2].request])
    s.start()
    try:
        assert [r.wait().finish for r in runs[:2]] == ["timeout", "timeout"]
        assert s.snapshot()["timed_out"] == 2 and s.snapshot()["rejected"] == 1
    finally:
        s.stop()


def test_choices_of_one_prompt_share_its_prefill(lm, scheduler):
    ids = PROMPTS[2]  # one list object for both, as the server passes the n choices
    params = [SamplingParams(temperature=1.0, top_k=20, seed=s) for s in (5, 6)]
    expected = [lm.generate(ids, max_tokens=6, **vars(p)).tokens for p in params]
    runs = [Run(ids, max_tokens=6, params=p) for p in params]
    runs[1].request.prompt_ids = runs[0].request.prompt_ids
    before = scheduler.snapshot()["prompt_tokens"]
    scheduler.submit([r.request for r in runs])
    assert [r.wait().tokens for r in runs] == expected
    assert scheduler.snapshot()["prompt_tokens"] - before == len(ids)  # computed once


def test_long_prompts_prefill_in_chunks_while_others_stream(lm, folder):
    theirs = hf_model(folder)
    s = Scheduler(lm.model, lm.tokenizer, max_batch=4, max_queue=8, prefill_chunk=3)
    s.start()
    try:
        order = []
        short = Run(PROMPTS[0], max_tokens=40, params=greedy())
        long_ids = list(range(1000, 1031))  # 31 tokens: 11 chunks of at most 3
        long = Run(long_ids, max_tokens=5, params=greedy(), prompt_logprobs=True)
        for name, run in (("short", short), ("long", long)):
            emit = run.request.emit
            run.request.emit = lambda e, emit=emit, name=name: (order.append(name), emit(e))
        s.submit([short.request])
        while not short.events:
            time.sleep(0.001)
        s.submit([long.request])
        long.wait()
        short.wait()
        # One decode step per chunk: the short request kept streaming during the prefill.
        assert order[: order.index("long")].count("short") >= 10
        with torch.no_grad():
            out = theirs.generate(
                torch.tensor([long_ids]),
                max_new_tokens=5,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            logits = theirs(torch.tensor([long_ids])).logits[0]
        assert long.tokens == out[0, len(long_ids) :].tolist()
        lp = torch.log_softmax(logits, -1)
        expected = [float(lp[i, long_ids[i + 1]]) for i in range(len(long_ids) - 1)]
        got = long.events[0].prompt_logprobs
        assert got[0] is None and got[1:] == pytest.approx(expected, abs=1e-4)
        assert short.tokens == lm.generate(PROMPTS[0], max_tokens=40, temperature=0.0).tokens
        assert s.snapshot()["prompt_tokens"] == len(PROMPTS[0]) + len(long_ids)
    finally:
        s.stop()


def test_cancel_during_a_chunked_prefill(lm):
    s = Scheduler(lm.model, lm.tokenizer, max_batch=2, max_queue=8, prefill_chunk=1)
    s.start()
    try:
        long = Run(list(range(2000, 2200)), max_tokens=50, params=greedy())
        s.submit([long.request])
        while s.snapshot()["prompt_tokens"] < 5:
            time.sleep(0.001)
        s.cancel(long.request)
        assert long.wait().finish == "cancelled"
        assert s.snapshot()["prompt_tokens"] < 200 and s.snapshot()["active"] == 0
        after = Run(PROMPTS[1], max_tokens=8, params=greedy())
        s.submit([after.request])
        assert after.wait().tokens == lm.generate(PROMPTS[1], max_tokens=8, temperature=0.0).tokens
    finally:
        s.stop()


def test_kv_memory_follows_the_requests_not_max_batch_times_the_window(lm):
    """The cache starts empty whatever --max-batch and the window are, grows with the rows
    and tokens in use, and is given back when the requests are done."""
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=16, max_queue=32)
    assert scheduler.snapshot()["kv_cache_bytes"] == 0
    scheduler.start()
    try:
        seen = []
        runs = [Run(ids, max_tokens=40, params=greedy()) for ids in PROMPTS[:2]]
        runs[0].request.emit = lambda event, run=runs[0]: (
            seen.append(scheduler.cache.nbytes),
            Run._emit(run, event),
        )
        scheduler.submit([r.request for r in runs])
        assert [r.wait().tokens for r in runs] == [
            lm.generate(ids, max_tokens=40, temperature=0).tokens for ids in PROMPTS[:2]
        ]
        c = lm.model.config  # K and V, fp32: one 256-slot block of 2 rows at most
        block = 2 * c.num_layers * 2 * c.num_kv_heads * 256 * c.head_dim * 4
        assert 0 < max(seen) <= block
        deadline = time.monotonic() + 10
        while scheduler.snapshot()["kv_cache_bytes"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.snapshot()["kv_cache_bytes"] == 0
    finally:
        scheduler.stop()
