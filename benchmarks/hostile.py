"""A hostile battery and a schemathesis pass against a live `pocketlm serve` (issue 19).

Starts `pocketlm serve MODEL --port 0 --api-key KEY --timeout T` as a subprocess on
127.0.0.1 (default: the embedded SmolLM2-135M; `--tiny` a random 2-layer GPT-2 with a
chat template, seconds instead of minutes), then:

1. the battery: ~200 requests a careless or hostile client sends -- sampling options at
   the edge of float range, malformed and oversized bodies, wrong Content-Type, foreign
   Host headers, bad keys, odd routes, broken HTTP (bad Content-Length, slow headers and
   bodies, idle connections, garbage bytes). Each case names the statuses it may get; a
   case passes when the status is one of them, an error is in OpenAI's JSON format, and
   /health still answers within a second afterwards.
2. schemathesis (`schemathesis run URL/openapi.json`, all phases, the key sent) with the
   not_a_server_error, status_code_conformance and content_type_conformance checks.

Prints the counts (and the server's memory before and after) and writes them to
benchmarks/results/hostile-<time>.json; docs/server-limits.md quotes a run.

    python benchmarks/hostile.py --tiny            # quick
    python benchmarks/hostile.py                   # the default model
    python benchmarks/hostile.py --no-schemathesis
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-hostile"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}
OK, BAD = {200}, {400}
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


@dataclass
class Case:
    name: str
    send: Callable[[str], int | None]  # base URL -> status (None: the connection closed)
    allowed: set


def post(route: str, body: object = None, *, raw: bytes | None = None, headers=JSON, **kw):
    def send(url: str) -> int:
        content = raw if raw is not None else json.dumps(body).encode()
        r = httpx.post(f"{url}{route}", content=content, headers=headers, timeout=120, **kw)
        _check_error_format(r)
        return r.status_code

    return send


def request(method: str, path: str, headers=AUTH):
    def send(url: str) -> int:
        r = httpx.request(method, f"{url}{path}", headers=headers, timeout=60)
        _check_error_format(r)
        return r.status_code

    return send


def wire(data: bytes, *, trickle: float = 0.0):
    """Raw bytes on a fresh connection (one byte every `trickle` s when set); the status
    of the answer, or None when the server closed without one."""

    def send(url: str) -> int | None:
        host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=45) as sock:
            if trickle:
                for byte in data:
                    if select.select([sock], [], [], trickle)[0]:
                        break
                    sock.sendall(bytes([byte]))
            elif data:
                sock.sendall(data)
            answer = _read_response(sock)
        match = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
        if match and int(match[1]) >= 400:
            body = answer.partition(b"\r\n\r\n")[2]
            if body and "error" not in json.loads(body):
                raise AssertionError(f"not an OpenAI error: {body[:200]!r}")
        return int(match[1]) if match else None

    return send


def _read_response(sock: socket.socket) -> bytes:
    """The first response on `sock` (head and body, by its Content-Length), or what came
    before the server closed."""
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
            head, found, body = answer.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            if found and length and len(body) >= int(length[1]):
                break
    except (ConnectionResetError, TimeoutError):
        pass
    return answer


def _check_error_format(r: httpx.Response) -> None:
    if r.status_code >= 400 and r.request.method != "HEAD":
        error = r.json()["error"]  # KeyError / JSONDecodeError: not OpenAI's format
        assert {"message", "type"} <= set(error), r.text


def cases() -> list[Case]:
    out: list[Case] = []

    def add(name, send, allowed):
        out.append(Case(name, send, set(allowed)))

    completion = {"prompt": "Hello", "max_tokens": 4}
    # -- sampling options at and past their edges --
    edges = {
        "temperature": [0, 1e-45, 5e-324, 1e-37, 1e-10, 0.5, 2, -0.0],
        "top_p": [1e-45, 5e-324, 1e-10, 1, 0.5],
        "top_k": [0, 1, 2, 10**9],
        "min_p": [0, 1, 1e-45, 0.999999],
        "repetition_penalty": [5e-324, 1e-45, 1e-37, 1e-10, 1, 10, 1e308],
        "presence_penalty": [-2, 2, 0],
        "frequency_penalty": [-2, 2, 0],
        "seed": [-(2**63), 2**64, 2**200, 0],
    }
    for name, values in edges.items():
        for value in values:
            add(f"{name}={value!r}", post("/v1/completions", {**completion, name: value}), OK)
    refused = {
        "temperature": [-1e-300, 2.0000001, "1", 1e309, True],
        "top_p": [0, 1.1, -1],
        "top_k": [-1, 1.5],
        "min_p": [-0.1, 1.1],
        "repetition_penalty": [0, -1, "2"],
        "presence_penalty": [2.1, -2.1],
        "frequency_penalty": [3],
        "n": [0, 17, -1, 1.5],
        "max_tokens": [0, -1, 10**9, "4"],
        "logprobs": [21, -1],
    }
    for name, values in refused.items():
        for value in values:
            body = {**completion, name: value}
            add(f"{name}={value!r} refused", post("/v1/completions", body), BAD)
    for combo in (
        {"temperature": 1e-45, "repetition_penalty": 5e-324, "top_p": 1e-45, "min_p": 1},
        {"temperature": 2, "top_k": 1, "repetition_penalty": 1e308, "presence_penalty": -2},
        {"temperature": 1e-37, "logprobs": 5, "echo": True, "n": 3},
        {"temperature": 5e-324, "stream": True},
        {"repetition_penalty": 5e-324, "stream": True, "n": 4},
    ):
        add(f"combination {combo}", post("/v1/completions", {**completion, **combo}), OK)
    for bias in ({"0": 100}, {"0": -100}, {"1": 1e-45}, {"49151": 5}):
        add(f"logit_bias={bias}", post("/v1/completions", {**completion, "logit_bias": bias}), OK)
    for bias in ({"-1": 1}, {"99999999": 1}, {"abc": 1}, {"0": 101}, {"0": "1"}):
        body = {**completion, "logit_bias": bias}
        add(f"logit_bias={bias} refused", post("/v1/completions", body), BAD)
    for stop in ("a" * 10_000, ["\n", "."], ["x"] * 4):
        add(f"stop={str(stop)[:20]}", post("/v1/completions", {**completion, "stop": stop}), OK)
    for stop in ("", ["x"] * 5, [""]):
        body = {**completion, "stop": stop}
        add(f"stop={str(stop)[:20]} refused", post("/v1/completions", body), BAD)
    # -- prompts --
    for prompt in ([[1, 2], [3]], [1, 2, 3], ["a", "b"], "\u0000", "{{ 7*7 }}{% raw %}", "ü" * 100):
        add(
            f"prompt={str(prompt)[:20]}",
            post("/v1/completions", {**completion, "prompt": prompt}),
            OK,
        )
    for prompt in ([], [[]], [-1], [10**12], "", [["a"]], None, {"a": 1}, 5):
        add(
            f"prompt={prompt!r} refused",
            post("/v1/completions", {**completion, "prompt": prompt}),
            BAD,
        )
    add("3.9 MB prompt", post("/v1/completions", {**completion, "prompt": "hello " * 650_000}), BAD)
    add(
        "prompt over the window",
        post("/v1/completions", {**completion, "prompt": "hi " * 9000}),
        BAD,
    )
    add("suffix", post("/v1/completions", {**completion, "suffix": "x"}), BAD)
    add("best_of 2", post("/v1/completions", {**completion, "best_of": 2}), BAD)
    add("unknown model", post("/v1/completions", {**completion, "model": "gpt-5"}), {404})
    add("unknown fields", post("/v1/completions", {**completion, "zzz": [1, {}]}), OK)
    # -- bodies --
    for label, raw in (
        ("not JSON", b"{"),
        ("invalid UTF-8", b'{"prompt": "\xff\xfe"}'),
        ("a JSON array", b"[]"),
        ("null", b"null"),
        ("a number", b"1e999999"),
        ("nested 10,000 deep", b"[" * 10_000 + b"]" * 10_000),
        ("empty", b""),
        ("lone surrogate", b'{"prompt": "\\ud800", "max_tokens": 2}'),
        ("NaN", b'{"prompt": "a", "temperature": NaN}'),
        ("Infinity", b'{"prompt": "a", "temperature": Infinity}'),
        ("trailing garbage", b'{"prompt": "a"} x'),
    ):
        allowed = OK | BAD if label == "lone surrogate" else BAD
        add(f"body: {label}", post("/v1/completions", raw=raw), allowed)
    add("5 MB body", post("/v1/completions", raw=b'{"prompt": "' + b"a" * (5 << 20) + b'"}'), {413})
    add("duplicate keys", post("/v1/completions", raw=b'{"prompt": "a", "prompt": "b"}'), OK)
    # -- headers: media type, host, key --
    body = json.dumps(completion).encode()
    for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""):
        headers = {**AUTH, **({"Content-Type": media} if media else {})}
        add(
            f"Content-Type {media or 'missing'}",
            post("/v1/completions", raw=body, headers=headers),
            {415},
        )
    add("application/json; charset", post("/v1/completions", raw=body, headers={**JSON, "Content-Type": "application/json; charset=utf-8"}), OK)  # fmt: skip
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io", "localhost.evil.example", "[::2]", "0.0.0.0"):  # fmt: skip
        add(
            f"Host {host}",
            post("/v1/completions", completion, headers={**JSON, "Host": host}),
            {403},
        )
        add(
            f"Host {host} /metrics",
            request("GET", "/metrics", headers={**AUTH, "Host": host}),
            {403},
        )
    for host in ("localhost", "127.0.0.1", "127.0.0.2:1", "[::1]", "app.localhost"):
        add(f"Host {host} /health", request("GET", "/health", headers={"Host": host}), OK)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}):  # fmt: skip
        add(f"auth {headers}", request("GET", "/v1/models", headers=headers), {401})
        add(f"auth {headers} /metrics", request("GET", "/metrics", headers=headers), {401})
    add("Origin gets no CORS", request("GET", "/v1/models", headers={**AUTH, "Origin": "http://evil.example"}), OK)  # fmt: skip
    # -- chat --
    user = [{"role": "user", "content": "Hi"}]
    for messages in (
        user * 200,  # a long prefill: done, or past --timeout on a slow machine
    ):
        add("chat 200 messages", post("/v1/chat/completions", {"messages": messages, "max_tokens": 3}), OK | {504})  # fmt: skip
    for messages in (
        user,
        [{"role": "system", "content": "Be brief."}, *user],
        [{"role": "developer", "content": "x"}, *user],
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": "{% for i in range(10**9) %}{% endfor %}"}],
    ):
        add(f"chat {str(messages)[:40]}", post("/v1/chat/completions", {"messages": messages, "max_tokens": 3}), OK)  # fmt: skip
    for messages in (
        [],
        [{"role": "bogus", "content": "x"}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"content": "x"}],
        "Hi",
    ):
        add(f"chat {str(messages)[:40]} refused", post("/v1/chat/completions", {"messages": messages}), BAD)  # fmt: skip
    for extra in ({"top_logprobs": 3}, {"max_completion_tokens": 0}, {"n": 17}):
        add(f"chat {extra} refused", post("/v1/chat/completions", {"messages": user, **extra}), BAD)  # fmt: skip
    for extra in ({"logprobs": True, "top_logprobs": 20}, {"stream": True, "n": 3}, {"temperature": 1e-45, "stream": True}):  # fmt: skip
        add(f"chat {extra}", post("/v1/chat/completions", {"messages": user, "max_tokens": 3, **extra}), OK)  # fmt: skip
    # -- embeddings --
    for value in ("hi", ["a", "b"], [1, 2], [[1], [2, 3]]):
        add(f"embeddings {str(value)[:20]}", post("/v1/embeddings", {"input": value}), OK)
    add("embeddings 2048 inputs", post("/v1/embeddings", {"input": ["x"] * 2048}), OK | {504})
    add("embeddings base64", post("/v1/embeddings", {"input": "hi", "encoding_format": "base64"}), OK)  # fmt: skip
    for value in (["x"] * 2049, [[1] * 200] * 1501, [], [[]], "", [-1], "hi " * 9000):
        add(f"embeddings {str(value)[:20]} refused", post("/v1/embeddings", {"input": value}), BAD)  # fmt: skip
    add("embeddings dimensions", post("/v1/embeddings", {"input": "a", "dimensions": 8}), BAD)
    # -- routes --
    for method, path, allowed in (
        ("GET", "/v1/nothing", {404}),
        ("POST", "/v1/models", {405, 415}),
        ("DELETE", "/v1/completions", {405}),
        ("PUT", "/v1/chat/completions", {405, 415}),
        ("GET", "/v1/completions", {405}),
        ("GET", "/v1/models/other", {404}),
        ("GET", "/../../etc/passwd", {404}),
        ("GET", "/v1/models/..%2f..%2fetc%2fpasswd", {404}),
        ("GET", "/" + "a" * 10_000, {404}),
        ("GET", "/health?x=" + "%00" * 100, OK),
        ("GET", "/openapi.json", OK),
        ("GET", "/", OK),
        ("GET", "/metrics", OK),
        ("OPTIONS", "/v1/completions", {405}),
        ("HEAD", "/health", {405, 200}),
    ):
        add(f"{method} {path[:40]}", request(method, path), allowed)
    # -- the wire --
    get = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for label, data, allowed in (
        (
            "bad Content-Length",
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
            BAD,
        ),  # fmt: skip
        (
            "negative Content-Length",
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n",
            BAD,
        ),  # fmt: skip
        (
            "two Content-Lengths",
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            BAD,
        ),  # fmt: skip
        ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64), BAD | {None}),
        ("no request line", b"\r\n\r\n", BAD | {None}),
        ("HTTP/1.1 without Host", b"GET /health HTTP/1.1\r\n\r\n", BAD),
        ("HTTP/1.0 without Host", b"GET /health HTTP/1.0\r\n\r\n", OK),
        (
            "64 KB header",
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"a" * 65536 + b"\r\n\r\n",
            OK | BAD | {431, None},  # read whole in one go, h11 takes it; slowly, refused
        ),  # fmt: skip
        ("pipelined", get * 3, OK),
        (
            "chunked JSON",
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b'20\r\n{"prompt": "a", "max_tokens": 1}\r\n0\r\n\r\n',
            OK,
        ),  # fmt: skip
        (
            "broken chunks",
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            BAD | {None},
        ),  # fmt: skip
        ("idle connection", b"", {None}),
        ("half a request line", b"GET /hea", {408, None}),
        (
            "slow body",
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + b"Authorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Length: 100\r\n\r\n{",
            {408},
        ),  # fmt: skip
    ):
        add(f"wire: {label}", wire(data), allowed)
    add("wire: headers 1 byte / 1.5 s", wire(get, trickle=1.5), {408, None})
    return out


def start(model: str | None, *, timeout: float, env: dict) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "pocketlm.cli.main", "serve", *([model] if model else [])]
    command += ["--port", "0", "--api-key", KEY, "--timeout", str(timeout), "--max-queue", "256"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()
    if not line.startswith("serving"):
        raise SystemExit(f"the server did not start: {line!r}")
    return process, line.split(" at ")[1].split()[0].removesuffix("/v1")


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024


def alive(url: str) -> float | None:
    """Seconds /health took to answer, or None when it did not (within 10 s)."""
    try:
        started = time.monotonic()
        ok = httpx.get(f"{url}/health", timeout=10).status_code == 200
        return time.monotonic() - started if ok else None
    except httpx.HTTPError:
        return None


def battery(url: str) -> dict:
    counts: Counter = Counter()
    failures = []
    for case in cases():
        try:
            status = case.send(url)
            ok = status in case.allowed
            counts["5xx"] += status is not None and status >= 500
            counts[f"status {status}"] += 1
        except Exception as error:  # a wrong error format, a dropped connection...
            ok, status = False, f"{type(error).__name__}: {error}"
        health = alive(url)
        if health is None:
            counts["server not answering after"] += 1
            ok = False
        else:
            counts["/health over 1 s after"] += health > 1.0
            counts["/health slowest ms"] = max(counts["/health slowest ms"], round(health * 1000))
        counts["cases"] += 1
        counts["as expected"] += ok
        if not ok:
            failures.append(f"{case.name}: got {status}, expected {sorted(map(str, case.allowed))}")
    return {"counts": dict(counts), "failures": failures}


def schemathesis(url: str, *, examples: int, seconds: int) -> dict:
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    report = Path(tempfile.mkdtemp()) / "report.json"
    command = [
        exe, "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {KEY}",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance",
        "--max-examples", str(examples), "--max-time", str(seconds), "--seed", "19",
        "--request-timeout", "60", "--workers", "2", "--no-color",
        "--suppress-health-check", "all", "--report", "ndjson",
        "--report-ndjson-path", str(report),
    ]  # fmt: skip
    # In a scratch folder: schemathesis keeps a cache of crashes in its working directory.
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=report.parent)
    summary = [line for line in result.stdout.splitlines() if line.strip()][-12:]
    cases = Counter()
    for line in report.read_text().splitlines() if report.exists() else []:
        event = json.loads(line)
        if "ScenarioFinished" in event:
            recorder = event["ScenarioFinished"].get("recorder", {})
            for step in (recorder.get("checks") or {}).values():
                for check in step:
                    cases[f"{check['name']} {check['status'].lower()}"] += 1
            for interaction in (recorder.get("interactions") or {}).values():
                response = interaction.get("response") or {}
                cases[f"status {response.get('status_code', 'none')}"] += 1
            cases["scenarios"] += 1
    return {"exit_code": result.returncode, "summary": summary, "checks": dict(cases)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer GPT-2, for speed")
    parser.add_argument("--model", default=None, help="what to serve (default: SmolLM2-135M)")
    parser.add_argument("--timeout", type=float, default=30.0, help="the server's --timeout")
    parser.add_argument("--no-schemathesis", action="store_true")
    parser.add_argument("--examples", type=int, default=50, help="schemathesis cases per route")
    parser.add_argument("--schemathesis-seconds", type=int, default=600)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    model = args.model
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from checkpoints import make_gpt2

        model = str(make_gpt2(Path(tempfile.mkdtemp()) / "tiny", n_positions=1024))
        (Path(model) / "chat_template.jinja").write_text(TEMPLATE)
    process, url = start(model, timeout=args.timeout, env=env)
    try:
        results: dict = {"model": model or "default", "rss_mb_start": rss_mb(process.pid)}
        started = time.monotonic()
        results["battery"] = battery(url)
        results["battery_seconds"] = round(time.monotonic() - started, 1)
        results["rss_mb_after_battery"] = rss_mb(process.pid)
        if not args.no_schemathesis:
            started = time.monotonic()
            results["schemathesis"] = schemathesis(
                url, examples=args.examples, seconds=args.schemathesis_seconds
            )
            results["schemathesis_seconds"] = round(time.monotonic() - started, 1)
            results["rss_mb_after_schemathesis"] = rss_mb(process.pid)
        results["alive_at_end"] = alive(url) is not None
    finally:
        process.terminate()
        process.wait(timeout=60)
    counts = results["battery"]["counts"]
    print(f"battery: {counts['cases']} cases, {counts['as expected']} as expected, "
          f"{counts.get('5xx', 0)} 5xx, server down after {counts.get('server not answering after', 0)}, "
          f"/health slowest {counts['/health slowest ms']} ms, over 1 s after "
          f"{counts.get('/health over 1 s after', 0)} ({results['battery_seconds']} s)")  # fmt: skip
    for failure in results["battery"]["failures"]:
        print("  unexpected:", failure)
    if "schemathesis" in results:
        print("schemathesis:", json.dumps(results["schemathesis"]["checks"]))
        print("\n".join(results["schemathesis"]["summary"]))
    print(f"memory: {results['rss_mb_start']:.0f} MB at start, "
          f"{results['rss_mb_after_battery']:.0f} MB after the battery"
          + (f", {results['rss_mb_after_schemathesis']:.0f} MB after schemathesis"
             if "rss_mb_after_schemathesis" in results else ""))  # fmt: skip
    out = ROOT / "benchmarks" / "results" / f"hostile-{time.strftime('%Y%m%d-%H%M')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
