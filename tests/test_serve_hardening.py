"""`pocketlm serve` against hostile and careless clients (issue 19), over real HTTP on
127.0.0.1: one server for the module (guard.server, as the command runs it, with short
connection deadlines and an API key) around a tiny random GPT-2 whose chat template
misbehaves on cue ("recurse", "overflow", ...). Expected texts come from the same
request served alone, or from greedy decoding (what a temperature's limit is)."""

import json
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from starlette.testclient import TestClient

import pocketlm
import test_serve_api
from checkpoints import make_gpt2
from pocketlm.cli.serve import bind
from pocketlm.serve.app import Service, create_app
from pocketlm.serve.guard import Limits, authorized, host_allowed
from pocketlm.tokenizer import chat_template

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEMPLATE = """\
{%- macro again(n) %}{{ again(n) }}{% endmacro -%}
{%- set c = messages[-1].content -%}
{%- if c == 'recurse' %}{{ again(1) }}
{%- elif c == 'overflow' %}{{ 10.0 ** (messages|length * 400) }}
{%- elif c == 'type' %}{{ messages + 1 }}
{%- elif c == 'zero' %}{{ 1 // (messages|length - 1) }}
{%- elif c == 'huge' %}{{ c * 100000000 }}
{%- elif c == 'spin' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}\
{% endfor %}
{%- else %}{% for m in messages %}{{ m.role }}: {{ m.content }}
{% endfor %}assistant:{% endif %}"""
LIMITS = Limits(
    header_timeout=1.0,
    body_timeout=1.0,
    keep_alive=1.0,
    drain=0.5,
    allowed_hosts=("pocketlm.test",),
)


class Server(test_serve_api.Server):
    def post(self, route, body, timeout=60):
        return httpx.post(f"{self.url}/v1/{route}", json=body, headers=AUTH, timeout=timeout)

    def complete(self, prompt, **options):
        r = self.post("completions", {"prompt": prompt, **options})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def close(self):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = make_gpt2(tmp_path_factory.mktemp("tiny"), n_positions=1024)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return pocketlm.load(folder)


@pytest.fixture(scope="module")
def live(lm):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chat_template, "RENDER_SECONDS", 1.0)
        live = Server(lm, max_batch=8, max_queue=80, timeout=60, api_key=KEY, limits=LIMITS)
        yield live
        live.close()


def stream(live, body):
    """The `data:` payloads of a streamed completion, in order."""
    with httpx.stream(
        "POST",
        f"{live.url}/v1/completions",
        json={**body, "stream": True},
        headers=AUTH,
        timeout=60,
    ) as r:
        assert r.status_code == 200
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def streamed_text(events):
    return "".join(json.loads(e)["choices"][0]["text"] for e in events if e != "[DONE]")


def test_poisoned_sampling_among_live_streams(live):
    prompts = ["The dog", "Hello world", "Once upon a time"]
    alone = [live.complete(p, max_tokens=24, temperature=0) for p in prompts]
    greedy = live.complete("Hello", max_tokens=20, temperature=0)
    poison = [
        {"temperature": 1e-45},  # 0 in float32: logits / 0
        {"temperature": 1e-37},
        {"temperature": 5e-324, "repetition_penalty": 5e-324},
        {"repetition_penalty": 1e308, "temperature": 0.01},
    ]
    with ThreadPoolExecutor(len(prompts) + len(poison)) as pool:
        streams = [
            pool.submit(stream, live, {"prompt": p, "max_tokens": 24, "temperature": 0})
            for p in prompts
        ]
        time.sleep(0.2)
        poisoned = [
            pool.submit(live.post, "completions", {"prompt": "Hello", "max_tokens": 20, **p})
            for p in poison
        ]
        together = [f.result(timeout=120) for f in streams]
        answers = [f.result(timeout=120) for f in poisoned]
    assert [streamed_text(events) for events in together] == alone
    assert all(events[-1] == "[DONE]" for events in together)
    assert [r.status_code for r in answers] == [200] * len(poison), [r.text for r in answers]
    # The limit of a temperature going to 0 is greedy decoding.
    assert [r.json()["choices"][0]["text"] for r in answers[:2]] == [greedy, greedy]


def test_foreign_host_is_refused_loopback_and_allowed_names_are_served(live):
    for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", "[::2]"):
        r = httpx.get(f"{live.url}/health", headers={"Host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", host
    r = httpx.get(f"{live.url}/metrics", headers={"Host": "evil.example", **AUTH})
    assert r.status_code == 403
    for host in ("localhost", f"localhost:{live.port}", "127.0.0.2", "[::1]:80", "pocketlm.test"):
        assert httpx.get(f"{live.url}/health", headers={"Host": host}).status_code == 200, host
    assert host_allowed(None, ()) and not host_allowed("localhost.evil.example", ())


def test_post_needs_json_and_no_cors_headers_by_default(live):
    body = b'{"prompt": "Hi", "max_tokens": 1}'
    for headers in (
        {"Content-Type": "text/plain"},
        {},
        {"Content-Type": "application/x-www-form-urlencoded"},
    ):
        r = httpx.post(f"{live.url}/v1/completions", content=body, headers={**headers, **AUTH})
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    ok = {"Content-Type": "application/json; charset=utf-8", "Origin": "http://evil.example"}
    r = httpx.post(f"{live.url}/v1/completions", content=body, headers={**ok, **AUTH})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    preflight = httpx.options(
        f"{live.url}/v1/completions",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_origin_allows_that_origin_only(lm):
    service = Service(lm, limits=Limits(cors_origin="http://localhost:3000"))
    with TestClient(create_app(service), base_url="http://localhost") as client:
        for origin, allowed in (("http://localhost:3000", True), ("http://evil.example", False)):
            r = client.options(
                "/v1/models",
                headers={"Origin": origin, "Access-Control-Request-Method": "GET"},
            )
            assert (r.headers.get("access-control-allow-origin") == origin) is allowed


def test_metrics_need_the_key_compared_in_constant_time(live):
    assert httpx.get(f"{live.url}/metrics").status_code == 401
    assert (
        httpx.get(f"{live.url}/metrics", headers={"Authorization": "Bearer sk-tesT"}).status_code
        == 401
    )
    assert httpx.get(f"{live.url}/metrics", headers=AUTH).status_code == 200
    assert httpx.get(f"{live.url}/health").status_code == 200  # liveness stays open
    assert (
        authorized(None, None) and not authorized("Bearer x", "y") and authorized("Bearer y", "y")
    )


def test_embedding_caps_and_an_abandoned_request_stops(live):
    r = live.post("embeddings", {"input": ["hi"] * 2049})
    assert r.status_code == 400 and "2048 inputs" in r.json()["error"]["message"]
    r = live.post("embeddings", {"input": [[1] * 200] * 1501})  # 300,200 tokens
    assert r.status_code == 400 and "300,000 tokens" in r.json()["error"]["message"]
    assert len(live.post("embeddings", {"input": ["hi"] * 3}).json()["data"]) == 3

    def embedded():
        for line in httpx.get(f"{live.url}/metrics", headers=AUTH).text.splitlines():
            if line.startswith("pocketlm_embedding_inputs_total "):
                return int(line.split()[1])

    before = embedded()
    with pytest.raises(httpx.TimeoutException):
        ids = [[i % 5000 + 1] * 16 for i in range(2048)]  # 32,768 tokens: seconds of work
        live.post("embeddings", {"input": ids}, timeout=0.3)
    # One worker runs embeddings in turn: this one starts when the abandoned one has
    # stopped (or, had it not, finished all 2,048 inputs).
    assert len(live.post("embeddings", {"input": ["a", "b"]}).json()["data"]) == 2
    assert embedded() - before - 2 < 2048


def test_health_answers_while_huge_prompts_and_slow_templates_are_refused(live):
    def health_times(stop):
        times = []
        while not stop.is_set():
            start = time.perf_counter()
            assert httpx.get(f"{live.url}/health").status_code == 200
            times.append(time.perf_counter() - start)
            time.sleep(0.05)
        return times

    stop = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        probe = pool.submit(health_times, stop)
        huge = live.post("completions", {"prompt": "hello " * 650_000, "max_tokens": 1})
        chat = {"messages": [{"role": "user", "content": "spin"}], "max_tokens": 1}
        spin = live.post("chat/completions", chat)
        stop.set()
        times = probe.result()
    assert huge.status_code == 400 and "cannot fit" in huge.json()["error"]["message"]
    assert spin.status_code == 400 and "longer than 1 s" in spin.json()["error"]["message"]
    assert max(times) < 1.0, times


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("recurse", "RecursionError"),
        ("overflow", "OverflowError"),
        ("type", "TypeError"),
        ("zero", "ZeroDivisionError"),
        ("huge", "400,000,000 items"),
    ],
)
def test_template_failures_are_a_400(live, content, words):
    r = live.post("chat/completions", {"messages": [{"role": "user", "content": content}]})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_the_chat_command_prints_a_template_failure_in_one_line(lm, monkeypatch, capsys, tmp_path):
    import os
    import sys

    from pocketlm.cli.main import main

    read, write = os.pipe()
    os.write(write, b"recurse\nhello\n")
    os.close(write)
    monkeypatch.setattr(sys, "stdin", os.fdopen(read))
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path))
    assert main(["chat", lm.name, "-t", "0", "-n", "2"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "RecursionError" in line] == [
        line for line in err.splitlines() if line.startswith("error:")
    ]


def raw(live):
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=5)
    sock.settimeout(5)
    return sock


def read_all(sock):
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_and_idle_clients_are_dropped(live):
    def idle():
        return read_all(raw(live))

    def slow_headers():
        sock = raw(live)
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        for byte in b"Host: 127.0.0.1\r\n":  # one byte every 0.2 s: never done in time
            if select.select([sock], [], [], 0.2)[0]:
                break  # the server answered
            sock.sendall(bytes([byte]))
        return read_all(sock)

    def slow_body():
        sock = raw(live)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            b'sk-test\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"p'
        )
        return read_all(sock)

    start = time.monotonic()
    with ThreadPoolExecutor(3) as pool:  # the deadlines are 1 s each: all three at once
        futures = [pool.submit(f) for f in (idle, slow_headers, slow_body)]
        idle, headers, body = [f.result() for f in futures]
    assert time.monotonic() - start < 3
    assert idle == b""  # an idle connection is closed quietly
    assert headers.startswith(b"HTTP/1.1 408") and body.startswith(b"HTTP/1.1 408")
    assert json.loads(body.partition(b"\r\n\r\n")[2])["error"]["message"].startswith(
        "the request's body did not arrive"
    )


def test_bad_content_length_is_a_json_400(live):
    sock = raw(live)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n")
    answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and "error" in json.loads(body)


def test_keep_alive_requests_are_not_delayed_by_nagle(live):
    assert bind("127.0.0.1", 0).proto == socket.IPPROTO_TCP
    # With Nagle's algorithm each keep-alive response after the first waits for a delayed
    # ACK (~40 ms: 44 ms against 7.6 ms in curl): the accepted sockets must say NODELAY.
    with httpx.Client() as client:
        for _ in range(3):
            assert client.get(f"{live.url}/health").status_code == 200
        sockets = [
            c.transport.get_extra_info("socket") for c in live.uvicorn.server_state.connections
        ]
        assert sockets and all(
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets
        )


def test_an_empty_api_key_and_a_bad_origin_are_refused(capsys):
    from pocketlm.cli.main import main

    assert main(["serve", "--api-key", ""]) == 1
    assert (
        capsys.readouterr().err == "error: --api-key is empty: give a key, or leave the flag out\n"
    )
    assert main(["serve", "--cors-origin", "*"]) == 1
    assert "must be an origin" in capsys.readouterr().err


def test_which_hosts_the_command_accepts():
    import argparse

    from pocketlm.cli import serve

    def hosts(*argv):
        parser = argparse.ArgumentParser()
        serve.add_parser(parser.add_subparsers())
        return serve.limits(parser.parse_args(["serve", *argv])).allowed_hosts

    assert hosts() == () and hosts("--host", "::1") == ()  # loopback: its own names only
    assert hosts("--host", "0.0.0.0") is None  # beyond it: any name, unless told
    assert hosts("--host", "0.0.0.0", "--allowed-hosts", "Box.lan, x") == ("box.lan", "x")


def test_model_by_id_and_openapi(live):
    r = httpx.get(f"{live.url}/v1/models/tiny", headers=AUTH)
    assert r.status_code == 200 and r.json()["id"] == "tiny"
    assert httpx.get(f"{live.url}/v1/models/other", headers=AUTH).status_code == 404
    spec = httpx.get(f"{live.url}/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
        assert "requestBody" in spec["paths"][path]["post"]
    assert "messages" in spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]


def test_one_request_with_many_rows_does_not_starve_a_small_one(live):
    big = {"prompt": ["The dog", "A cat", "Hi", "Yes", "No", "Up", "So", "We"], "n": 8}

    def timed(body):
        start = time.monotonic()
        r = live.post("completions", body)
        assert r.status_code == 200, r.text
        return time.monotonic() - start

    with ThreadPoolExecutor(2) as pool:
        many = pool.submit(timed, {**big, "max_tokens": 10, "temperature": 0})
        time.sleep(0.2)
        one = pool.submit(timed, {"prompt": "Hello", "max_tokens": 1})
        many, one = many.result(timeout=120), one.result(timeout=120)
    # 64 rows of 10 tokens through 8 slots take ~80 steps; the small request waits for
    # one row to finish (~10 steps), not for all 56 rows queued before it.
    assert one < 0.5 * many, (one, many)


def test_sigterm_drains_open_streams_and_ends_the_rest_with_an_event(lm):
    live = Server(lm, limits=Limits(drain=0.5))
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(stream, live, {"prompt": "Hi", "max_tokens": 1000, "temperature": 0})
        short = pool.submit(stream, live, {"prompt": "Hi", "max_tokens": 8, "temperature": 0})
        time.sleep(0.3)
        live.uvicorn.should_exit = True  # what uvicorn's SIGTERM handler does
        long, short = long.result(timeout=30), short.result(timeout=30)
    live.thread.join(timeout=20)
    assert short[-1] == "[DONE]" and json.loads(short[-2])["choices"][0]["finish_reason"]
    assert "shutting down" in json.loads(long[-1])["error"]["message"]
