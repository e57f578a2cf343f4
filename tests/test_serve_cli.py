"""`pocketlm serve` as a user runs it, and the real SmolLM2-135M-Instruct behind the API.

- The command: a subprocess on a free loopback port (--port 0, the URL read from its first
  line) answering the `openai` client, logging each request on stderr, stopped by Ctrl-C;
  the warning for a non-loopback address without a key; bad flags as one-line errors.
- SmolLM2 through its chat template (server in a thread, to load the model once):
  replies equal `pocketlm.LM.generate` on the template's prompt ids, and concurrent
  greedy requests equal the same requests served one at a time.
"""

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import pocketlm
from checkpoints import make_gpt2
from pocketlm.cli.main import main as cli
from test_serve_api import Server

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Name a color."},
    ],
    [{"role": "user", "content": "Say hello."}],
]


def test_the_command_serves_the_openai_client_and_stops_on_ctrl_c(tmp_path):
    folder = make_gpt2(tmp_path / "tiny-model")
    process = subprocess.Popen(
        [sys.executable, "-m", "pocketlm", "serve", str(folder), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        first = []
        reader = threading.Thread(
            target=lambda: first.append(process.stdout.readline()), daemon=True
        )
        reader.start()
        reader.join(timeout=90)
        assert first and first[0].startswith("serving tiny-model at http://127.0.0.1:"), first
        url = first[0].split(" at ")[1].split()[0]
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        r = client.completions.create(
            model="tiny-model", prompt="The dog", max_tokens=5, temperature=0
        )
        expected = pocketlm.load(folder).generate("The dog", max_tokens=5, temperature=0.0)
        assert r.choices[0].text == expected.text
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(url.removesuffix("/v1") + "/no-such-page", timeout=30)
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
    assert code == 130  # the CLI's exit code for Ctrl-C, after a graceful shutdown
    err = process.stderr.read()
    assert "Traceback" not in err
    # the request log: one line per request, method, path, status, time
    assert re.search(r"^\d\d:\d\d:\d\d POST /v1/completions 200 \d+ ms$", err, re.M), err
    assert re.search(r"^\d\d:\d\d:\d\d GET /no-such-page 404 \d+ ms$", err, re.M), err


def test_warns_beyond_loopback_without_a_key_and_refuses_bad_flags(tmp_path, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="pocketlm"):
        assert cli(["serve", str(tmp_path / "missing"), "--host", "0.0.0.0"]) == 1
    assert "listening on 0.0.0.0 without --api-key" in caplog.text
    err = capsys.readouterr().err  # the model is missing: one line, and nothing was bound
    assert err.splitlines()[-1].startswith("error: no such file") and "Traceback" not in err
    assert cli(["serve", "--max-batch", "0"]) == 1
    assert capsys.readouterr().err == "error: --max-batch must be at least 1\n"
    with pytest.raises(SystemExit):  # serve batches requests instead of drafting
        cli(["serve", "--draft", "x"])
    assert "unrecognized arguments: --draft" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    # fp32: a batch then gives each request exactly its solo tokens. As stored (the
    # default), activations are rounded to int8 per 32 values, and the last-bit
    # differences of attention over a batch's longer, masked cache can round a value the
    # other way: the texts then agree up to a near tie only (as in llama.cpp's server).
    lm = pocketlm.load(smollm2_gguf, offline=True, dtype="fp32")
    server = Server(lm, max_batch=4, max_queue=8, timeout=120)
    yield lm, server
    server.close()


def test_smollm2_chat_template_replies_alone_and_batched(smollm2):
    lm, server = smollm2
    client = server.client()

    def ask(messages):
        r = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0
        )
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.prompt_tokens

    ids = lm.tokenizer.encode(lm.tokenizer.render_chat(MESSAGES[0]), add_bos=False)
    expected = lm.generate(ids, max_tokens=8, temperature=0.0)
    alone = [ask(m) for m in MESSAGES]
    assert alone[0] == (expected.text, expected.finish_reason, len(ids))
    assert "Paris" in alone[0][0]
    with ThreadPoolExecutor(len(MESSAGES)) as pool:
        together = list(pool.map(ask, MESSAGES, timeout=120))
    assert together == alone


def test_which_addresses_count_as_loopback():
    from pocketlm.cli.serve import is_loopback

    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.5", "example.com"]))
