"""`pocketlm serve` as a user runs it: a subprocess on a free loopback port (--port 0, the
URL read from its first line) serving the real SmolLM2-135M-Instruct through its chat
template. Replies are checked against `pocketlm.LM.generate` on the template's prompt
ids, concurrent greedy requests against the same requests served one at a time."""

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import pocketlm

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Name a color."},
    ],
    [{"role": "user", "content": "Say hello."}],
]


def pocketlm_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pocketlm.cli.main", *args]


@pytest.fixture(scope="module")
def served(smollm2_gguf):
    process = subprocess.Popen(
        pocketlm_cli("serve", str(smollm2_gguf), "--port", "0", "--max-batch", "4"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    first = []
    reader = threading.Thread(target=lambda: first.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=90)
    assert first and first[0].startswith("serving "), (first, process.poll())
    url = first[0].split(" at ")[1].split()[0]  # http://127.0.0.1:PORT/v1
    assert url.startswith("http://127.0.0.1:")
    yield url, process
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def lm(smollm2_gguf):
    return pocketlm.load(smollm2_gguf, offline=True)


def test_chat_template_replies_and_batching_with_smollm2(served, lm):
    url, _ = served
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    assert model == "SmolLM2-135M-Instruct.Q4_1.gguf"

    def ask(messages):
        r = client.chat.completions.create(
            model=model, messages=messages, max_tokens=10, temperature=0
        )
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.prompt_tokens

    ids = lm.tokenizer.encode(lm.tokenizer.render_chat(MESSAGES[0]), add_bos=False)
    expected = lm.generate(ids, max_tokens=10, temperature=0.0)
    alone = [ask(m) for m in MESSAGES]
    assert alone[0] == (expected.text, expected.finish_reason, len(ids))
    assert "Paris" in alone[0][0]
    with ThreadPoolExecutor(len(MESSAGES)) as pool:
        together = list(pool.map(ask, MESSAGES, timeout=120))
    assert together == alone


def test_interrupt_stops_the_server(served):
    _, process = served
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=20) == 130  # the CLI's exit code for Ctrl-C
    assert "Traceback" not in process.stderr.read()


def test_warns_when_bound_beyond_loopback_without_a_key(tmp_path):
    result = subprocess.run(
        pocketlm_cli("serve", str(tmp_path / "missing"), "--host", "0.0.0.0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("warning: listening on 0.0.0.0 without --api-key")
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr
    result = subprocess.run(
        pocketlm_cli("serve", "--max-batch", "0"), capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stderr) == (1, "error: --max-batch must be at least 1\n")
