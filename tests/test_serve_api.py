"""`pocketlm serve` over real HTTP on 127.0.0.1, driven by the official `openai` client and
by raw httpx for what a client library would not send. The server runs in a thread
(uvicorn on a socket bound to a free loopback port) around a tiny random GPT-2; expected
outputs come from `pocketlm.LM.generate` (the B=1 path, itself checked against
transformers), transformers' hidden states, and the same request served alone."""

import base64
import json
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import pocketlm
from checkpoints import hf_model, make_gpt2
from pocketlm.cli.serve import bind
from pocketlm.prompting.chat import Harness
from pocketlm.serve import guard
from pocketlm.serve.app import Service, create_app
from pocketlm.serve.fleet import Fleet

MODEL = "tiny"


class Server:
    """`pocketlm serve`'s server (its connection deadlines, its drain) on a thread."""

    def __init__(self, lm, **options):
        self.service = Service(lm, name=MODEL, **options)
        self.fleet = Fleet.of(self.service)  # the server-wide settings: its API key
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.uvicorn = guard.server(
            create_app(self.fleet), limits=self.fleet.limits, cancel_all=self.fleet.cancel_all
        )
        self.uvicorn.config.install_signal_handlers = False  # a thread: no signals
        self.thread = threading.Thread(
            target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, api_key="none"):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def metrics(self):
        text = httpx.get(f"{self.url}/metrics").text
        return {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if not line.startswith("#")
        }

    def close(self):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_gpt2(tmp_path_factory.mktemp("tiny"), n_positions=1024)


@pytest.fixture(scope="module")
def lm(folder):
    return pocketlm.load(folder)


@pytest.fixture(scope="module")
def server(lm):
    server = Server(lm, max_batch=8, max_queue=32, timeout=60)
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_models_health_and_page(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    page = httpx.get(f"{server.url}/")
    assert (
        page.status_code == 200
        and "/v1/chat/completions" in page.text
        and "http" not in page.text.split("<script>")[1].split("fetch(")[0]
    )


def test_completion_matches_generate_and_streams_the_same(lm, client):
    expected = lm.generate("The dog", max_tokens=12, temperature=0.0)
    r = client.completions.create(model=MODEL, prompt="The dog", max_tokens=12, temperature=0)
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (2, 12, 14)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="The dog",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_through_the_transcript_harness(lm, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt = Harness().render(system="Be brief.", turns=[], message="Hi there")
    expected = lm.generate(prompt, max_tokens=10, temperature=0.0, stop=["\nUser:"])
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == len(lm.tokenizer.encode(prompt))
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert (
        all(c.usage is None for c in chunks[:-1])
        and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    )


def test_n2_seeds_and_reproducibility(lm, client):
    def sample(seed, n=1):
        r = client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=10,
            temperature=1.0,
            seed=seed,
            n=n,
            extra_body={"top_k": 40},
        )
        return [c.text for c in r.choices]

    two = sample(7, n=2)
    assert two == [sample(7)[0], sample(8)[0]]  # choice i uses seed + i
    assert two[0] != two[1]
    assert (
        two[0]
        == lm.generate("Once upon a time", max_tokens=10, temperature=1.0, top_k=40, seed=7).text
    )
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        n=2,
        max_tokens=6,
        temperature=1.0,
        seed=3,
    )
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[
        0
    ].message.content != chat.choices[1].message.content


def test_logprobs_echo_and_top_logprobs(lm, client):
    expected = lm.generate("The dog", max_tokens=5, temperature=0.0, logprobs=0)
    r = client.completions.create(
        model=MODEL, prompt="The dog", max_tokens=5, temperature=0, logprobs=3, echo=True
    )
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "The dog" + expected.text
    assert lp.tokens[:2] == ["The", " dog"] and lp.token_logprobs[0] is None
    with torch.no_grad():
        logits = lm.model(torch.tensor([[464, 3290]]), torch.arange(2)[None])[0]
    assert lp.token_logprobs[1] == pytest.approx(
        float(torch.log_softmax(logits[0], -1)[3290]), abs=1e-5
    )
    assert lp.token_logprobs[2:] == pytest.approx(expected.logprobs, abs=1e-5)
    assert all(len(top) == 3 for top in lp.top_logprobs[2:]) and lp.text_offset[:3] == [0, 3, 7]
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[
            0
        ].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_stop_and_logit_bias(lm, client):
    full = lm.generate("The dog", max_tokens=16, temperature=0.0).text
    stop = full[4:7]
    r = client.completions.create(
        model=MODEL, prompt="The dog", max_tokens=16, temperature=0, stop=[stop, "zzzz"]
    )
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(
        model=MODEL,
        prompt="The dog",
        max_tokens=5,
        temperature=0.8,
        logit_bias={"1049": 100},
        logprobs=0,
    )
    assert r.choices[0].text == lm.tokenizer.decode([1049] * 5)


def test_errors_surface_as_openai_exceptions(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="x")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=5000)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=3
        )
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", logit_bias={"99999999": 1})
    service = server.service
    server.fleet.api_key = "sesame"
    try:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        assert server.client(api_key="sesame").models.list().data[0].id == MODEL
    finally:
        server.fleet.api_key = None
    service.scheduler.max_queue = 0
    try:
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert info.value.response.headers["retry-after"] == "1"
    finally:
        service.scheduler.max_queue = 32
    service.timeout = 0.0
    try:
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert info.value.status_code == 504
    finally:
        service.timeout = 60


BAD = [
    ("completions", b'{"model": "tiny", "prompt": "x",', "not valid JSON"),
    ("completions", b'{"model": "tiny", "prompt": "x", "max_tokens": "5"}', "max_tokens"),
    ("completions", b'{"model": "tiny", "prompt": 5}', "prompt"),
    ("completions", b'{"model": "nope", "prompt": "x"}', "does not exist"),
    ("completions", json.dumps({"prompt": "hello " * 1100}).encode(), "context is 1,024"),
    ("completions", b'{"prompt": "x", "max_tokens": 1000000}', "max_tokens can be at most"),
    ("completions", b'{"prompt": "x", "n": -1}', "n"),
    ("completions", b'{"prompt": "\xff\xfe"}', "UTF-8"),
    ("completions", b'{"prompt": [99999999]}', "token ids"),
    ("completions", b'{"prompt": ""}', "empty"),
    ("completions", b'{"prompt": "x", "stop": [""]}', "stop"),
    ("completions", b"[]", "invalid request"),
    ("chat/completions", b'{"messages": []}', "messages"),
    ("chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', "role"),
    (
        "chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": '
        b'"json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": true}}}}',
        "uniqueItems",
    ),
    ("embeddings", b'{"input": 3}', "input"),
    (
        "chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}',
        "tools",
    ),
]


@pytest.mark.parametrize(("route", "body", "needle"), BAD)
def test_bad_input_is_a_4xx_in_openai_format_and_the_server_keeps_serving(
    server, client, route, body, needle
):
    r = httpx.post(
        f"{server.url}/v1/{route}", content=body, headers={"Content-Type": "application/json"}
    )
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert (
        needle in error["message"]
        and error["type"] == "invalid_request_error"
        and set(error) == {"message", "type", "param", "code"}
    )


def test_oversized_body_unknown_route_and_still_serving(server, client, lm):
    r = httpx.post(
        f"{server.url}/v1/completions",
        content=b'{"prompt": "' + b"a" * (5 << 20) + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = client.completions.create(model=MODEL, prompt="The dog", max_tokens=4, temperature=0)
    assert r.choices[0].text == lm.generate("The dog", max_tokens=4, temperature=0.0).text


def test_16_concurrent_streams_equal_the_same_requests_served_alone(server, client):
    words = [
        "The dog",
        "Hello world",
        "Once upon",
        "In 1990",
        "A B C",
        "Python is",
        "My name",
        "Go",
    ]
    requests = [dict(prompt=f"{words[i % 8]} {i}", max_tokens=8 + (5 * i) % 23) for i in range(16)]

    def stream(request):
        chunks = client.completions.create(model=MODEL, temperature=0, stream=True, **request)
        return "".join(c.choices[0].text for c in chunks)

    alone = [
        client.completions.create(model=MODEL, temperature=0, **r).choices[0].text for r in requests
    ]
    steps_before = server.metrics()["pocketlm_decode_steps_total"]
    with ThreadPoolExecutor(16) as pool:
        together = [f.result(timeout=120) for f in [pool.submit(stream, r) for r in requests]]
    assert together == alone
    # Shared decode steps: far fewer than the 16 requests' tokens one by one.
    steps = server.metrics()["pocketlm_decode_steps_total"] - steps_before
    assert steps < sum(r["max_tokens"] for r in requests) / 3


def test_client_leaving_mid_stream_frees_its_row(server):
    before = server.metrics()
    body = {
        "model": MODEL,
        "prompt": "The dog",
        "max_tokens": 1000,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert got[0].startswith("data: {")
    deadline = time.monotonic() + 20
    while True:
        m = server.metrics()
        if (
            m["pocketlm_requests_cancelled_total"]
            == before["pocketlm_requests_cancelled_total"] + 1
            and m["pocketlm_active_requests"] == 0
        ):
            break
        assert time.monotonic() < deadline, "the row was not freed"
        time.sleep(0.05)
    assert m["pocketlm_generation_tokens_total"] - before["pocketlm_generation_tokens_total"] < 1000


def test_embeddings_are_mean_pooled_last_hidden_states(folder, client):
    texts = ["Hello world", "The dog barked loudly"]
    r = client.embeddings.create(model=MODEL, input=texts)
    theirs, tokenizer = hf_model(folder), pocketlm.tokenizer.Tokenizer.gpt2()
    for text, item in zip(texts, r.data, strict=True):
        ids = tokenizer.encode(text)
        with torch.no_grad():
            hidden = theirs(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        assert item.embedding == pytest.approx(hidden.mean(0).tolist(), abs=1e-4)
    assert r.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in texts)
    raw = httpx.post(
        f"{client.base_url}embeddings", json={"input": texts[0], "encoding_format": "base64"}
    ).json()
    decoded = struct.unpack(
        f"<{len(r.data[0].embedding)}f", base64.b64decode(raw["data"][0]["embedding"])
    )
    assert list(decoded) == pytest.approx(r.data[0].embedding, abs=1e-6)


def test_time_limit_mid_stream_is_an_error_event(server, client):
    server.service.timeout = 0.0
    try:
        with pytest.raises(openai.APIError, match="time limit|limit of 0 s"):
            list(client.completions.create(model=MODEL, prompt="x", max_tokens=50, stream=True))
    finally:
        server.service.timeout = 60


def test_client_leaving_a_plain_request_frees_its_row(server):
    before = server.metrics()["pocketlm_requests_cancelled_total"]
    body = {"model": MODEL, "prompt": "The dog", "max_tokens": 1000, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 20
    while server.metrics()["pocketlm_requests_cancelled_total"] == before:
        assert time.monotonic() < deadline, "the row was not freed"
        time.sleep(0.05)
    assert server.metrics()["pocketlm_active_requests"] == 0
    # ... and with no request left, the KV memory is given back (it grows again on demand)
    deadline = time.monotonic() + 10
    while server.metrics()["pocketlm_kv_cache_bytes"] > 0:
        assert time.monotonic() < deadline, "the KV cache was not given back"
        time.sleep(0.05)


def test_a_shared_prefix_is_a_prefix_cache_hit_in_metrics(server, client):
    """The second prompt starting like the first reuses its whole blocks (serve/prefix_cache.py;
    outputs with the cache on and off: tests/test_prefix_cache.py)."""
    before = server.metrics()
    system = "You are a terse assistant who answers every question in a single word. " * 6
    for question in ("Why?", "How?"):
        client.completions.create(
            model=MODEL, prompt=system + question, max_tokens=2, temperature=0
        )
    after = server.metrics()
    gained = {k: after[k] - before[k] for k in after if k.startswith("pocketlm_prefix_cache")}
    assert gained["pocketlm_prefix_cache_hits_total"] >= 1
    assert gained["pocketlm_prefix_cache_reused_tokens_total"] >= 32
    assert after["pocketlm_prefix_cache_bytes"] > 0
