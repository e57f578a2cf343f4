"""The other APIs `pocketlm serve` speaks -- Ollama's (/api/*), Anthropic's Messages
(/v1/messages) and llama.cpp's / vLLM's /tokenize and /detokenize -- and its honest limits,
over real HTTP on 127.0.0.1 with the official `ollama`, `anthropic` and `openai` clients.

One server for the module, around a tiny random GPT-2 with a 64-token context and a chat
template. Expected outputs come from `pocketlm.LM.generate` (the B=1 path, itself checked
against transformers) on the prompt the template renders, and from the OpenAI routes
(checked in test_serve_api.py) for embeddings."""

import json
import math
from importlib import metadata

import anthropic
import httpx
import ollama
import openai
import pytest

import pocketlm
from checkpoints import make_gpt2
from pocketlm.sampling import SamplingParams
from pocketlm.serve import anthropic as anthropic_api
from pocketlm.serve import ollama as ollama_api
from pocketlm.serve import ollama_schemas
from pocketlm.serve.schemas import ApiError, parse
from test_serve_api import Server

MODEL = "tiny"
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = make_gpt2(tmp_path_factory.mktemp("tiny"), n_positions=64)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    lm = pocketlm.load(folder)
    assert lm.tokenizer.chat_template == TEMPLATE and lm.context_length == 64
    return lm


@pytest.fixture(scope="module")
def server(lm):
    server = Server(lm, max_batch=4, max_queue=16, timeout=60)
    yield server
    server.close()


def rendered(lm, *messages):
    """The prompt ids the chat template gives for (role, content) pairs."""
    text = lm.tokenizer.render_chat(
        [{"role": r, "content": c} for r, c in messages], add_generation_prompt=True
    )
    return lm.tokenizer.encode(text, add_bos=False)


def greedy(lm, ids, n, **options):
    return lm.generate(ids, max_tokens=n, temperature=0.0, **options)


# -- Ollama ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def olla(server):
    return ollama.Client(host=server.url, timeout=60)


def test_ollama_generate_and_chat_streamed_and_not(lm, olla):
    ids = rendered(lm, ("system", "Be brief."), ("user", "The dog"))
    expected = greedy(lm, ids, 8)
    options = {"temperature": 0, "num_predict": 8}
    r = olla.generate(model=MODEL, prompt="The dog", system="Be brief.", options=options)
    assert (r.response, r.done, r.done_reason) == (expected.text, True, "length")
    assert (r.prompt_eval_count, r.eval_count) == (len(ids), 8)
    assert list(r.context) == ids + expected.tokens and r.total_duration > 0
    more = olla.generate(model=MODEL, prompt=" And", context=r.context, raw=True, options=options)
    assert more.response == greedy(lm, r.context + lm.tokenizer.encode(" And"), 8).text
    parts = list(
        olla.generate(
            model=MODEL, prompt="The dog", system="Be brief.", options=options, stream=True
        )
    )
    assert "".join(p.response for p in parts) == expected.text
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    raw = olla.generate(model=f"{MODEL}:latest", prompt="The dog", raw=True, options=options)
    assert raw.response == greedy(lm, "The dog", 8).text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The dog"}]
    c = olla.chat(model=MODEL, messages=messages, options=options)
    assert (c.message.role, c.message.content, c.done_reason) == (
        "assistant",
        expected.text,
        "length",
    )
    streamed = list(olla.chat(model=MODEL, messages=messages, options=options, stream=True))
    assert "".join(p.message.content for p in streamed) == expected.text
    assert streamed[-1].done and streamed[-1].eval_count == 8
    assert olla.generate(model=MODEL).done_reason == "load"  # no prompt: Ollama's "load"


def test_ollama_options_seed_stop_and_limits(lm, olla, server):
    ids = rendered(lm, ("user", "Once upon"))
    seeded = {"temperature": 1.0, "seed": 7, "num_predict": 10}
    first = olla.generate(model=MODEL, prompt="Once upon", options=seeded).response
    assert first == olla.generate(model=MODEL, prompt="Once upon", options=seeded).response
    # Ollama's defaults beside the seed: top_k 40, top_p 0.9
    assert first == lm.generate(ids, max_tokens=10, seed=7, top_k=40, top_p=0.9).text
    text = greedy(lm, ids, 12).text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    options = {"temperature": 0, "num_predict": 12, "stop": [stop]}
    r = olla.generate(model=MODEL, prompt="Once upon", options=options)
    assert (r.response, r.done_reason) == (text[: text.index(stop)], "stop")
    long = "hello " * 70
    with pytest.raises(
        ollama.ResponseError,
        match=f"prompt has {len(lm.tokenizer.encode(long))} tokens; this model's context is 64 ",
    ) as info:
        olla.generate(model=MODEL, prompt=long, raw=True)
    assert info.value.status_code == 400
    with pytest.raises(ollama.ResponseError, match=f"prompt has {len(ids)} tokens; num_ctx is 8 "):
        olla.generate(model=MODEL, prompt="Once upon", options={"num_ctx": 8})
    with pytest.raises(
        ollama.ResponseError, match=f"num_predict is 100, .* at most {64 - len(ids)}"
    ):
        olla.generate(model=MODEL, prompt="Once upon", options={"num_predict": 100})
    # the opt-in: keep the prompt's last tokens (pocketlm's `truncate`, as on /api/embed)
    body = {
        "model": MODEL,
        "prompt": long,
        "raw": True,
        "stream": False,
        "truncate": True,
        "options": {"temperature": 0, "num_predict": 4},
    }
    cut = httpx.post(f"{server.url}/api/generate", json=body, timeout=60).json()
    full = lm.tokenizer.encode(long)
    assert cut["prompt_eval_count"] == 60 and cut["response"] == greedy(lm, full[-60:], 4).text
    with pytest.raises(ollama.ResponseError, match="does not exist") as info:
        olla.generate(model="llama3", prompt="x")
    assert info.value.status_code == 404


def test_ollama_embed_tags_show_ps_version(lm, olla, server):
    r = olla.embed(model=MODEL, input=["Hello world", "The dog"])
    reference = server.client().embeddings.create(model=MODEL, input=["Hello world", "The dog"])
    for got, ref in zip(r.embeddings, reference.data, strict=True):
        norm = math.sqrt(sum(x * x for x in ref.embedding))
        assert max(abs(g - x / norm) for g, x in zip(got, ref.embedding, strict=True)) < 1e-6
    assert r.prompt_eval_count == 4
    with pytest.raises(ollama.ResponseError, match="has 71 tokens; this model.s context is 64"):
        olla.embed(model=MODEL, input="hello " * 70)
    assert len(olla.embed(model=MODEL, input="hello " * 70, truncate=True).embeddings) == 1
    legacy = olla.embeddings(model=MODEL, prompt="The dog").embedding  # the older route
    assert legacy == pytest.approx(reference.data[1].embedding, abs=1e-6)
    (listed,) = olla.list().models
    assert listed.model == MODEL and listed.details.family == "gpt2"
    assert listed.details.parameter_size == pocketlm.weights.card.human_count(
        pocketlm.weights.card.describe(lm.path).parameters
    )
    shown = olla.show(MODEL)
    assert shown.modelinfo["gpt2.context_length"] == 64 and shown.template == TEMPLATE
    assert shown.capabilities == ["completion"]
    (running,) = olla.ps().models
    weights = sum(t.numel() * t.element_size() for t in lm.model.parameters())
    assert running.model == MODEL and running.size >= weights and running.context_length == 64
    version = httpx.get(f"{server.url}/api/version").json()
    assert version == {"version": metadata.version("pocketlm")}


# -- Anthropic ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=60)


def test_anthropic_messages_streamed_and_not(lm, claude):
    ids = rendered(lm, ("system", "Be brief."), ("user", "Hi there"))
    expected = greedy(lm, ids, 10)
    ask = dict(
        model=MODEL,
        max_tokens=10,
        extra_body={"temperature": 0},
        system="Be brief.",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}],
    )
    r = claude.messages.create(**ask)
    assert (r.role, r.content[0].text, r.stop_reason) == ("assistant", expected.text, "max_tokens")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (len(ids), 10)
    assert claude.messages.count_tokens(
        model=MODEL, system="Be brief.", messages=ask["messages"]
    ).input_tokens == len(ids)
    events = list(claude.messages.create(**ask, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == expected.text
    assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 10
    with claude.messages.stream(**ask) as stream:
        assert "".join(stream.text_stream) == expected.text
        assert stream.get_final_message().stop_reason == "max_tokens"
    stop = expected.text[3:5]
    r = claude.messages.create(**{**ask, "stop_sequences": [stop]})
    assert (r.content[0].text, r.stop_reason) == (
        expected.text[: expected.text.index(stop)],
        "stop_sequence",
    )
    assert r.stop_sequence == stop


def test_anthropic_prefill_errors_and_api_key(lm, claude, server):
    ids = rendered(lm, ("user", "Hi")) + lm.tokenizer.encode(" Well,", add_bos=False)
    r = claude.messages.create(
        model=MODEL,
        max_tokens=6,
        extra_body={"temperature": 0},
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Well, "}],
    )
    assert r.content[0].text == greedy(lm, ids, 6).text
    ask = dict(max_tokens=4, messages=[{"role": "user", "content": "hello " * 70}])
    with pytest.raises(
        anthropic.BadRequestError,
        match=f"prompt has {len(rendered(lm, ('user', 'hello ' * 70)))} tokens; this model's context is 64",
    ):
        claude.messages.create(model=MODEL, **ask)
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="another-model", **ask)
    server.fleet.api_key = "sesame"
    try:
        with pytest.raises(anthropic.AuthenticationError) as info:
            claude.messages.create(
                model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x"}]
            )
        assert info.value.body["error"]["type"] == "authentication_error"
        keyed = anthropic.Anthropic(base_url=server.url, api_key="sesame", max_retries=0)
        assert (
            keyed.messages.create(
                model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x"}]
            ).usage.output_tokens
            == 2
        )
    finally:
        server.fleet.api_key = None


# -- tokenize / detokenize, and OpenAI's truncation opt-in ----------------------------------


def test_tokenize_and_detokenize_in_both_shapes(lm, server):
    post = lambda path, body: httpx.post(f"{server.url}/{path}", json=body, timeout=30).json()  # noqa: E731
    assert post("tokenize", {"content": "Hello world"})["tokens"] == [15496, 995]
    assert post("tokenize", {"prompt": "Hello world", "model": MODEL}) == {
        "tokens": [15496, 995],
        "count": 2,
        "max_model_len": 64,
    }
    pieces = post("tokenize", {"content": "Hello world", "with_pieces": True})["tokens"]
    assert pieces == [{"id": 15496, "piece": "Hello"}, {"id": 995, "piece": " world"}]
    chat = post("tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    assert chat["tokens"] == rendered(lm, ("user", "Hi"))
    assert post("detokenize", {"tokens": [15496, 995]}) == {
        "content": "Hello world",
        "prompt": "Hello world",
    }
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and "token ids" in bad.json()["error"]["message"]


def test_openai_over_context_is_refused_unless_truncation_is_asked(lm, server):
    client = server.client()
    prompt = "hello " * 70
    ids = lm.tokenizer.encode(prompt)
    with pytest.raises(
        openai.BadRequestError, match=f"prompt has {len(ids)} tokens; this model's context is 64 "
    ):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
    with pytest.raises(
        openai.BadRequestError, match="max_tokens is 100, but the prompt has 2 tokens"
    ):
        client.completions.create(model=MODEL, prompt="The dog", max_tokens=100)
    r = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=4,
        temperature=0,
        extra_body={"truncate_prompt_tokens": -1},
    )
    assert r.usage.prompt_tokens == 60 and r.choices[0].text == greedy(lm, ids[-60:], 4).text
    r = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=4,
        temperature=0,
        extra_body={"truncate_prompt_tokens": 20},
    )
    assert r.usage.prompt_tokens == 20 and r.choices[0].text == greedy(lm, ids[-20:], 4).text
    with pytest.raises(
        openai.BadRequestError,
        match=f"prompt has {len(rendered(lm, ('user', prompt)))} tokens; this model's context is 64",
    ):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}])


# -- the pure conversions ------------------------------------------------------------------


def test_ollama_options_become_engine_params():
    options = ollama_schemas.Options
    assert ollama_api.sampling_params(options(), vocab_size=100) == SamplingParams(
        temperature=0.8, top_k=40, top_p=0.9
    )
    assert ollama_api.sampling_params(options(seed=-1, temperature=0), vocab_size=100) == (
        SamplingParams(temperature=0.0, top_k=40, top_p=0.9)
    )
    ids = list(range(10))
    with pytest.raises(ApiError, match="prompt has 10 tokens; num_ctx is 8 "):
        ollama_api.fit(ids, options(num_ctx=8), truncate=False, context_length=64)
    assert ollama_api.fit(ids, options(num_ctx=8), truncate=True, context_length=64) == (ids[3:], 1)
    assert ollama_api.fit(ids, options(num_predict=5), truncate=True, context_length=12) == (
        ids[3:],
        5,
    )
    assert ollama_api.fit(ids, options(num_ctx=999), truncate=False, context_length=16) == (ids, 6)
    body = parse(ollama_schemas.ChatRequest, b'{"model": "m", "options": null}')
    assert body.options == options() and body.stream is None
    for bad in ({"think": True}, {"options": {"mirostat": 2}}):
        with pytest.raises(ApiError, match="not supported|does not support"):
            ollama_api.refuse_unsupported(ollama_schemas.ChatRequest(**bad))


def test_anthropic_stop_reasons_errors_and_content_blocks():
    stop_reason = anthropic_api.stop_reason
    assert stop_reason("stop", None, ["###"]) == ("end_turn", None)  # end-of-text
    assert stop_reason("stop", "\nUser:", ["###"]) == ("end_turn", None)  # the harness's turn
    assert stop_reason("stop", "###", ["###"]) == ("stop_sequence", "###")
    assert stop_reason("length", None, None) == ("max_tokens", None)
    assert anthropic_api.error_body(ApiError("busy", status=429)) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "busy"},
    }
    assert anthropic_api.error_body(ApiError("x", status=504))["error"]["type"] == "api_error"
    blocks = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert anthropic_api.text_of(blocks, where="messages.0") == "ab"
    with pytest.raises(ApiError, match="messages.0.content.1: only text content blocks"):
        anthropic_api.text_of([blocks[0], {"type": "image"}], where="messages.0")


def test_a_failure_after_the_stream_began_is_an_error_line_or_event(olla, claude, server):
    server.service.timeout = 0.0  # every request is past its time limit when it is admitted
    try:
        with pytest.raises(ollama.ResponseError, match="longer than the server's limit"):
            list(olla.generate(model=MODEL, prompt="x", stream=True))
        with pytest.raises(ollama.ResponseError, match="longer than the server's limit") as info:
            olla.chat(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=False)
        assert info.value.status_code == 504
        with pytest.raises(anthropic.APIStatusError, match="longer than the server's limit"):
            list(
                claude.messages.create(
                    model=MODEL,
                    max_tokens=2,
                    messages=[{"role": "user", "content": "x"}],
                    stream=True,
                )
            )
    finally:
        server.service.timeout = 60


def test_api_key_guards_ollama_and_tokenize_too(server):
    server.fleet.api_key = "sesame"
    try:
        with pytest.raises(ollama.ResponseError, match="API key") as info:
            ollama.Client(host=server.url).list()
        assert info.value.status_code == 401
        keyed = ollama.Client(host=server.url, headers={"Authorization": "Bearer sesame"})
        assert keyed.list().models[0].model == MODEL
        assert httpx.post(f"{server.url}/tokenize", json={"content": "x"}).status_code == 401
    finally:
        server.fleet.api_key = None


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


def test_structured_outputs_through_ollama_format_and_anthropic_output_config(
    lm, olla, claude, server
):
    ids = rendered(lm, ("user", "Answer in JSON."))
    expected = greedy(lm, ids, 24, schema=SCHEMA)
    assert expected.finish_reason == "stop" and set(json.loads(expected.text)) == {"ok", "n"}
    options = {"temperature": 0, "num_predict": 24}
    r = olla.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Answer in JSON."}],
        format=SCHEMA,
        options=options,
    )
    assert r.message.content == expected.text and r.done_reason == "stop"
    anything = olla.generate(model=MODEL, prompt="Answer in JSON.", format="json", options=options)
    assert anything.response == greedy(lm, ids, 24, schema={"type": "object"}).text
    m = claude.messages.create(
        model=MODEL,
        max_tokens=24,
        extra_body={"temperature": 0},
        messages=[{"role": "user", "content": "Answer in JSON."}],
        output_config={"format": {"type": "json_schema", "schema": SCHEMA}},
    )
    assert m.content[0].text == expected.text and m.stop_reason == "end_turn"
    bad = httpx.post(
        f"{server.url}/api/generate",
        timeout=30,
        json={"model": MODEL, "prompt": "x", "format": "yaml", "stream": False},
    )
    assert bad.status_code == 400 and "format must be" in bad.json()["error"]


def test_anthropic_tool_blocks_become_the_openai_routes_messages_and_back():
    body = anthropic_api.CountTokensRequest(
        model=MODEL,
        system="Be brief.",
        messages=[
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"city": "Oslo"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "down"},
                    {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True},
                ],
            },
        ],
    )
    plain = [
        m.model_dump(exclude_none=True, exclude_defaults=True)
        for m in anthropic_api.chat_messages(body)
    ]
    assert plain == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "toolu_1", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "content": "down", "tool_call_id": "toolu_1"},
        {"role": "tool", "content": "Error: ", "tool_call_id": "toolu_1"},
    ]
    # The model's text, whole or one character at a time: the same blocks
    from pocketlm.prompting.tools import DEFAULT
    from pocketlm.serve.tools import Tooling

    tooling = Tooling(DEFAULT, [], "auto", True, None)
    text = 'Sure. <tool_call>\n{"name": "w", "arguments": {"city": "Oslo"}}\n</tool_call>'
    whole = anthropic_api.Blocks(tooling).feed(text, final=True)
    pieces = anthropic_api.Blocks(tooling)
    split = [e for c in text for e in pieces.feed(c, final=False)] + pieces.feed("", final=True)
    for events in (whole, split):
        blocks = anthropic_api.content(events)
        assert [b["type"] for b in blocks] == ["text", "tool_use"] and pieces.called
        assert blocks[0]["text"] == "Sure." and blocks[1]["input"] == {"city": "Oslo"}
    assert anthropic_api.content(anthropic_api.Blocks(None).feed("", final=True)) == [
        {"type": "text", "text": ""}
    ]
