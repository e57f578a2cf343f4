"""`pocketlm serve` with a model that runs through transformers (no native module: GPT-J
here): one request at a time, over real HTTP on 127.0.0.1 with the official `openai`
client. The oracle is transformers' own greedy `generate` on the same folder."""

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import pocketlm
from checkpoints import make_gptj
from pocketlm.models import make_cache
from pocketlm.serve.app import Service
from pocketlm.serve.scheduler import Scheduler
from test_serve_api import MODEL, Server

PROMPTS = ["Falcons fly", "The quick brown fox", "Once upon a time there"]


@pytest.fixture(scope="module")
def gptj(tmp_path_factory):
    return make_gptj(tmp_path_factory.mktemp("gptj"))


@pytest.fixture(scope="module")
def lm(gptj):
    lm = pocketlm.load(str(gptj))
    assert lm.native is False
    return lm


@pytest.fixture(scope="module")
def expected(gptj, lm):
    """prompt -> the 12 greedy tokens' text, from transformers' generate."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gptj).eval()
    texts = {}
    for prompt in PROMPTS:
        ids = lm.tokenizer.encode(prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)  # fmt: skip
        texts[prompt] = lm.tokenizer.decode(out[0, len(ids) :].tolist())
    assert len(set(texts.values())) == len(PROMPTS)  # distinct answers, or mix-ups would pass
    return texts


@pytest.fixture(scope="module")
def server(lm):
    server = Server(lm, max_batch=8, max_queue=8, timeout=60)
    yield server
    server.close()


def test_serving_says_it_answers_one_request_at_a_time(lm, caplog):
    with caplog.at_level(logging.INFO, logger="pocketlm"):
        service = Service(lm, name=MODEL, max_batch=8)
    assert service.scheduler.max_batch == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "runs through transformers" in lines[0] and "one sequence at a time" in lines[0]
    with pytest.raises(ValueError, match="max_batch=1"):  # the scheduler will not batch it
        Scheduler(lm.model, lm.tokenizer, max_batch=2)


def test_completion_and_stream_match_transformers(server, expected):
    client = server.client()
    prompt = PROMPTS[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == expected[prompt] and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
    )
    assert len(chunks) > 2  # streamed piece by piece
    assert "".join(c.choices[0].text for c in chunks) == expected[prompt]


def test_concurrent_requests_queue_and_are_all_answered(server, expected):
    client = server.client()

    def complete(prompt: str) -> str:
        stream = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in stream)

    before = server.metrics()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(complete, PROMPTS))
    assert answers == [expected[p] for p in PROMPTS]
    after = server.metrics()
    assert after["pocketlm_max_batch"] == 1
    assert after["pocketlm_requests_total"] - before["pocketlm_requests_total"] == len(PROMPTS)
    deadline = time.monotonic() + 10  # the last event leaves just before the row is freed
    while server.metrics()["pocketlm_kv_cache_bytes"] != 0:
        assert time.monotonic() < deadline, "the finished requests' cache was not given back"
        time.sleep(0.02)


def test_the_fallback_cache_is_one_row_of_kv_cache(lm):
    cache = make_cache(lm.model, batch_size=1)
    assert (cache.rows, cache.slots, cache.nbytes) == (0, 0, 0)
    with torch.no_grad():
        lm.model(torch.tensor([[464, 3290, 373, 1043, 287]]), torch.arange(5)[None], cache.row(0))
    hf = lm.model.hf.config
    kv_heads = hf.num_attention_heads  # GPT-J: a key/value head per head
    head_dim = hf.hidden_size // hf.num_attention_heads
    per_slot = hf.num_hidden_layers * 2 * kv_heads * head_dim * 4  # k and v, fp32
    assert (cache.rows, cache.slots, cache.nbytes) == (1, 5, 5 * per_slot)
    cache.trim(1, 3)
    assert (cache.slots, cache.nbytes) == (3, 3 * per_slot)
    cache.trim(0, 0)
    assert (cache.rows, cache.slots, cache.nbytes) == (0, 0, 0)


def test_chat_and_seeded_sampling(server, lm):
    client = server.client()
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0
    )
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1
    sampled = client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=1.0, seed=5
    )
    assert (
        sampled.choices[0].text
        == lm.generate(PROMPTS[1], max_tokens=8, temperature=1.0, seed=5).text
    )
