"""`pocketlm serve` with several models (serve/fleet.py), over real HTTP on 127.0.0.1 with
the official `openai`, `ollama` and `anthropic` clients.

Four tiny random GPT-2s in one folder (A, B and C small, D too big for the second
server's budget). The servers are built by `pocketlm serve`'s own code from its command line
(`find_models`, `load_models`) and run in a thread as test_serve_api's `Server`. Expected
answers come from each model loaded alone (`pocketlm.load`, greedy). A model's load is
made to wait on an event (the real load behind a gate), so "B answers while C is loading"
is shown by C's state, not by timing.
"""

import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import ollama
import openai
import pytest
import torch

import pocketlm
from checkpoints import make_gpt2
from pocketlm.cli.main import build_parser
from pocketlm.cli.main import main as cli
from pocketlm.cli.serve import bind, find_models, load_models
from pocketlm.serve import guard
from pocketlm.serve.app import create_app
from pocketlm.serve.fleet import held_bytes, keep_alive_seconds
from pocketlm.serve.schemas import ApiError

A, B, C, D = "tiny-a", "tiny-b", "tiny-c", "tiny-d"


class FleetServer:
    """`pocketlm serve ARGS...` (its own parsing and loading) on a thread."""

    def __init__(self, *argv):
        # The suite's thread count, so loading (which sets it for the process) leaves
        # later tests as it found them.
        threads = ["--threads", str(torch.get_num_threads())]
        args = build_parser("serve").parse_args(["serve", *argv, *threads, "--quiet"])
        self.fleet = load_models(args, find_models(args))
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = guard.server(
            create_app(self.fleet), limits=self.fleet.limits, cancel_all=self.fleet.cancel_all
        )
        self.uvicorn.config.install_signal_handlers = False
        self.thread = threading.Thread(
            target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        wait_for(lambda: self.uvicorn.started, "the server did not start")
        self.openai = openai.OpenAI(base_url=f"{self.url}/v1", api_key="-", max_retries=0)
        self.ollama = ollama.Client(host=self.url, timeout=60)

    def running(self):
        return [m.model for m in self.ollama.ps().models]

    def close(self):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)


def wait_for(condition, what, seconds=30):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    make_gpt2(folder / A, seed=1, n_layer=1, n_positions=64)
    make_gpt2(folder / B, seed=2, n_layer=2, n_positions=64)
    make_gpt2(folder / C, seed=3, n_layer=1, n_positions=64)
    make_gpt2(folder / D, seed=4, n_layer=1, n_embd=256, n_positions=64)
    return folder


@pytest.fixture(scope="module")
def alone(folder):
    return {name: pocketlm.load(folder / name) for name in (A, B)}


@pytest.fixture(scope="module")
def server(folder):
    # A named, and found again in the folder (served once); a long keep-alive here.
    server = FleetServer(str(folder / A), "--models-dir", str(folder), "--keep-alive", "60")
    yield server
    server.close()


def greedy(lm, prompt, n=8):
    return lm.generate(prompt, max_tokens=n, temperature=0.0).text


def test_each_model_answers_by_name_as_it_does_alone(server, alone):
    assert server.running() == [A]  # the first model loads at start, the others on demand
    listed = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [(m["id"], m["loaded"]) for m in listed] == [(A, 1), (B, 0), (C, 0), (D, 0)]
    for name, lm in alone.items():
        r = server.openai.completions.create(
            model=name, prompt="The dog", max_tokens=8, temperature=0
        )
        assert (r.model, r.choices[0].text) == (name, greedy(lm, "The dog"))
        r = server.ollama.generate(
            model=name, prompt="A cat", raw=True, options={"temperature": 0, "num_predict": 8}
        )
        assert r.response == greedy(lm, "A cat")
    assert greedy(alone[A], "The dog") != greedy(alone[B], "The dog")
    # no model named: the first; Ollama's ":latest" tag names the model itself
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "The dog", "max_tokens": 8, "temperature": 0},
    )
    assert r.json()["model"] == A and r.json()["choices"][0]["text"] == greedy(alone[A], "The dog")
    assert server.ollama.show(f"{B}:latest").modelinfo["gpt2.block_count"] == 2
    tokens = httpx.post(f"{server.url}/tokenize", json={"model": B, "content": "The dog"})
    assert tokens.json()["tokens"] == alone[B].tokenizer.encode("The dog", add_bos=False)
    listed = server.openai.models.list().data
    assert [(m.id, m.model_extra["loaded"]) for m in listed] == [(A, 1), (B, 1), (C, 0), (D, 0)]
    assert [m.model for m in server.ollama.list().models] == [A, B, C, D]
    assert sorted(server.running()) == [A, B]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert f'pocketlm_requests_total{{model="{B}"}} 2' in metrics


def test_an_unknown_model_is_a_404_in_each_api_naming_the_models(server):
    names = f"'{A}', '{B}', '{C}', '{D}'"
    with pytest.raises(openai.NotFoundError, match=f"'gpt-4' does not exist; .* runs {names}"):
        server.openai.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(ollama.ResponseError, match="does not exist") as info:
        server.ollama.chat(model="llama3:8b", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404
    claude = anthropic.Anthropic(base_url=server.url, api_key="-", max_retries=0)
    with pytest.raises(anthropic.NotFoundError, match="does not exist"):
        claude.messages.create(
            model="claude", max_tokens=4, messages=[{"role": "user", "content": "x"}]
        )
    r = httpx.post(f"{server.url}/detokenize", json={"model": "nope", "tokens": [1]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # NAME:ADAPTER, split at the last colon: a LoRA adapter this base does not have
    with pytest.raises(openai.NotFoundError, match=f"'{A}' has no adapter 'mine'"):
        server.openai.completions.create(model=f"{A}:mine", prompt="x", max_tokens=1)


def test_a_model_loading_stalls_neither_another_model_nor_a_second_load(server, alone):
    gate, calls, real = threading.Event(), [], server.fleet.load

    def gated(spec):  # the real load, once the test opens the gate
        calls.append(spec.name)
        assert gate.wait(30)
        return real(spec)

    server.fleet.load = gated
    ask = dict(prompt="Hi", max_tokens=4, temperature=0)
    try:
        with ThreadPoolExecutor(2) as pool:
            waiting = [
                pool.submit(server.openai.completions.create, model=C, **ask) for _ in range(2)
            ]
            wait_for(lambda: calls == [C], "the load of C did not start")
            r = server.openai.completions.create(
                model=B, prompt="The dog", max_tokens=8, temperature=0
            )
            assert r.choices[0].text == greedy(alone[B], "The dog")
            assert not any(f.done() for f in waiting) and C not in server.running()
            gate.set()
            first, second = (f.result(timeout=60) for f in waiting)
    finally:
        gate.set()
        server.fleet.load = real
    assert first.choices[0].text == second.choices[0].text
    assert calls == [C]  # both requests waited for the one load
    assert C in server.running()


def test_keep_alive_unloads_a_model_and_frees_it_and_a_request_reloads_it(server, alone):
    options = {"temperature": 0, "num_predict": 4}
    r = server.ollama.generate(model=B, prompt="The dog", raw=True, options=options)
    weights = weakref.ref(server.fleet.loaded[B].service.lm.model)
    server.ollama.generate(model=B, keep_alive=0)  # Ollama's way to unload a model
    wait_for(lambda: B not in server.running(), "B did not unload after keep_alive 0")
    wait_for(lambda: weights() is None, "B's weights were not freed")
    ps = subprocess.run(
        [sys.executable, "-m", "pocketlm", "ps", "--url", server.url],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    lines = ps.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    shown = {line.split()[0]: line for line in lines[1:]}
    assert sorted(shown) == [A, C] and " in " in shown[A] and "CPU" in shown[A]
    again = server.ollama.generate(model=B, prompt="The dog", raw=True, options=options)
    assert again.response == r.response == greedy(alone[B], "The dog", 4)
    assert B in server.running()


def test_models_ram_evicts_idle_models_least_recently_used_first(folder, alone):
    sizes = [held_bytes(lm.model) for lm in alone.values()]
    budget = sum(sizes) + (1 << 20)  # room for two of A, B and C; D never fits
    server = FleetServer(
        "--models-dir", str(folder), "--keep-alive", "1", "--models-ram", f"{budget / 2**20}MB"
    )
    try:
        ask = dict(
            prompt="The dog",
            raw=True,
            keep_alive="1m",
            options={"temperature": 0, "num_predict": 8},
        )
        for name in (A, B, A):  # kept a minute each (not the server's 1 s); A used last
            r = server.ollama.generate(model=name, **ask)
            assert r.response == greedy(alone[name], "The dog")
        assert sorted(server.running()) == [A, B]
        server.ollama.generate(model=C, **ask)
        assert sorted(server.running()) == [A, C]  # B, the least recently used, made room
        # A request to A stays in flight while A's scheduler is paused (as a long answer
        # would): A is now the least recently used, yet C is the one unloaded for B.
        scheduler = server.fleet.loaded[A].service.scheduler
        scheduler.stop()
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(
                server.openai.completions.create,
                model=A,
                prompt="A cat",
                max_tokens=8,
                temperature=0,
            )
            wait_for(lambda: server.fleet.loaded[A].users == 1, "the request to A did not come")
            r = server.openai.completions.create(
                model=B, prompt="The dog", max_tokens=8, temperature=0
            )
            assert r.choices[0].text == greedy(alone[B], "The dog")
            assert sorted(server.running()) == [A, B] and not answer.done()
            scheduler.start()
            assert answer.result(timeout=60).choices[0].text == greedy(alone[A], "A cat")
        # B came by the OpenAI API: the server's --keep-alive 1 applies
        wait_for(lambda: server.running() == [A], "B did not unload after --keep-alive 1")
        with pytest.raises(openai.InternalServerError, match=f"'{D}' needs .* --models-ram"):
            server.openai.completions.create(model=D, prompt="x", max_tokens=1)
        assert server.running() == [A]
    finally:
        server.close()


def test_ollama_keep_alive_durations():
    assert [keep_alive_seconds(v) for v in (300, "300", "5m", "1h30m", "300ms", 0)] == [
        300.0, 300.0, 300.0, 5400.0, 0.3, 0.0,
    ]  # fmt: skip
    assert keep_alive_seconds(-1) is None and keep_alive_seconds("-5m") is None  # never
    with pytest.raises(ApiError, match="not a duration"):
        keep_alive_seconds("5 minutes")


def test_models_dir_mistakes_are_one_line_errors(tmp_path, capsys):
    assert cli(["serve", "--models-dir", str(tmp_path / "missing")]) == 1
    assert (
        capsys.readouterr().err == f"error: --models-dir {tmp_path / 'missing'}: no such folder\n"
    )
    (tmp_path / "notes.txt").write_text("no model here")
    assert cli(["serve", "--models-dir", str(tmp_path)]) == 1
    assert "holds no model (.gguf files or HF folders)" in capsys.readouterr().err
