"""The pure wire <-> engine functions of the server and its request schemas, on hand-built
inputs with hand-computed results (the GPT-2 tokenizer is the only real object used)."""

import base64
import json
import struct

import pytest

from pocketlm.prompting.chat import Harness, Turn
from pocketlm.serve import convert
from pocketlm.serve.convert import Choice
from pocketlm.serve.scheduler import Event
from pocketlm.serve.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    parse,
)
from pocketlm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def gpt2():
    tokenizer = Tokenizer.gpt2()
    assert tokenizer.encode("Hello world") == [15496, 995]  # a sane tokenizer
    return tokenizer


def completion(**fields) -> CompletionRequest:
    return parse(CompletionRequest, json.dumps({"prompt": "x", **fields}).encode())


def chat(**fields) -> ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return parse(ChatCompletionRequest, json.dumps(body).encode())


def test_defaults_are_openai_defaults():
    request = completion()
    assert (request.max_tokens, request.n, request.stream, request.echo) == (16, 1, False, False)
    params = convert.sampling_params(request, vocab_size=100)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (1.0, 1.0, 0, 0.0)
    assert chat().max_tokens is None  # chat: all the room left


def test_sampling_params_carry_every_option():
    request = completion(
        temperature=0,
        top_p=0.5,
        presence_penalty=0.5,
        frequency_penalty=-1,
        logit_bias={"7": -100, "3": 2.5},
        seed=-4,
        top_k=3,
        min_p=0.1,
        repetition_penalty=1.3,
    )
    p = convert.sampling_params(request, vocab_size=10)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (0, 0.5, 3, 0.1, 1.3)
    assert (p.presence_penalty, p.frequency_penalty, p.seed) == (0.5, -1, -4)
    assert dict(p.logit_bias) == {7: -100, 3: 2.5}
    with pytest.raises(ApiError, match="out of range"):
        convert.sampling_params(completion(logit_bias={"10": 1}), vocab_size=10)
    with pytest.raises(ApiError, match="token ids"):
        convert.sampling_params(completion(logit_bias={"the": 1}), vocab_size=10)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"prompt": "x", "max_tokens": "5"}', "max_tokens"),  # strict: no string -> int
        (b'{"prompt": "x", "max_tokens": true}', "max_tokens"),
        (b'{"prompt": "x", "n": 0}', "n"),
        (b'{"prompt": "x", "temperature": 2.5}', "temperature"),
        (b'{"prompt": "x", "logprobs": 21}', "logprobs"),
        (b'{"max_tokens": 3}', "prompt"),
        (b'{"prompt": [1, "a"]}', "prompt"),
    ],
)
def test_schema_errors_name_the_field(body, param):
    with pytest.raises(ApiError) as info:
        parse(CompletionRequest, body)
    assert info.value.status == 400 and info.value.param.split(".")[0] == param


def test_bad_json_and_bad_utf8():
    with pytest.raises(ApiError, match="not valid JSON"):
        parse(CompletionRequest, b'{"prompt": ')
    with pytest.raises(ApiError, match="not valid UTF-8"):
        parse(CompletionRequest, b'{"prompt": "\xc3\x28"}')
    assert parse(EmbeddingRequest, b'{"input": [[1, 2], [3]]}').input == [[1, 2], [3]]


def test_error_body_is_openai_shaped():
    error = ApiError("nope", status=404, param="model", code="model_not_found")
    assert error.body() == {
        "error": {
            "message": "nope",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_stop_strings_seeds_and_token_budget():
    assert convert.stop_strings("\n") == ("\n",) and convert.stop_strings(None) == ()
    with pytest.raises(ApiError):
        convert.stop_strings(["a", ""])
    with pytest.raises(ApiError, match="at most 4"):
        convert.stop_strings(list("abcde"))
    assert [convert.choice_seed(5, i) for i in range(3)] == [5, 6, 7]
    assert convert.choice_seed(None, 1) is None
    assert convert.token_budget(prompt_tokens=10, max_tokens=None, context_length=16) == 6
    # The server's default when the request says nothing, cut to the room left.
    budget = dict(prompt_tokens=10, max_tokens=None, context_length=16)
    assert convert.token_budget(**budget, default=4) == 4
    assert convert.token_budget(**budget, default=512) == 6
    assert convert.token_budget(**{**budget, "max_tokens": 5}, default=4) == 5
    assert convert.token_budget(prompt_tokens=10, max_tokens=6, context_length=16) == 6
    with pytest.raises(
        ApiError, match="max_tokens is 7, but the prompt has 10 tokens.* at most 6"
    ) as info:
        convert.token_budget(prompt_tokens=10, max_tokens=7, context_length=16)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(ApiError, match="prompt has 16 tokens; this model's context is 16, "):
        convert.token_budget(prompt_tokens=16, max_tokens=None, context_length=16)
    with pytest.raises(ApiError, match="prompt has 40,012 tokens; this model's context is 8,192 "):
        convert.token_budget(prompt_tokens=40012, max_tokens=None, context_length=8192)


def test_truncate_prompt_only_when_asked():
    ids = list(range(10))
    assert convert.truncate_prompt(ids, None, max_tokens=4, context_length=8) == ids
    assert convert.truncate_prompt(ids, 3, max_tokens=4, context_length=8) == [7, 8, 9]
    assert convert.truncate_prompt(ids, 30, max_tokens=4, context_length=8) == ids
    assert convert.truncate_prompt(ids, -1, max_tokens=5, context_length=8) == [7, 8, 9]
    assert convert.truncate_prompt(ids, -1, max_tokens=None, context_length=8) == ids[-7:]
    with pytest.raises(ApiError, match="at least 1"):
        convert.truncate_prompt(ids, 0, max_tokens=None, context_length=8)


def test_prompt_ids_take_every_prompt_form(gpt2):
    assert convert.prompt_ids("Hello world", gpt2, vocab_size=50257) == [[15496, 995]]
    assert convert.prompt_ids(["Hello", " world"], gpt2, vocab_size=50257) == [[15496], [995]]
    assert convert.prompt_ids([1, 2], gpt2, vocab_size=50257) == [[1, 2]]
    assert convert.prompt_ids([[1], [2, 3]], gpt2, vocab_size=50257) == [[1], [2, 3]]
    for bad in ("", [], [[]], [50257]):
        with pytest.raises(ApiError):
            convert.prompt_ids(bad, gpt2, vocab_size=50257)


def test_chat_prompt_without_a_template_is_the_transcript_harness(gpt2):
    request = parse(
        ChatCompletionRequest,
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Who "},
                            {"type": "text", "text": "are you?"},
                        ],
                    },
                ]
            }
        ).encode(),
    )
    ids, stops = convert.chat_prompt(request.messages, gpt2)
    text = Harness().render(
        system="Be brief.", turns=[Turn("Hi", " Hello!")], message="Who are you?"
    )
    assert gpt2.decode(ids) == text and text.endswith(
        "User: Hi\nAssistant: Hello!\nUser: Who are you?\nAssistant:"
    )
    assert stops == ("\nUser:",)
    with pytest.raises(ApiError, match="last message"):
        convert.transcript_turns(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        )


def test_chat_prompt_with_a_template(gpt2):
    templated = Tokenizer.gpt2()
    templated.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    request = chat(
        messages=[{"role": "developer", "content": "Rules"}, {"role": "user", "content": "Hi"}]
    )
    ids, stops = convert.chat_prompt(request.messages, templated)
    assert templated.decode(ids) == "<system>Rules\n<user>Hi\n<assistant>" and stops == ()


def events_for(gpt2, pieces):
    """Events as the scheduler sends them for tokens of `pieces`, last one finishing."""
    out = []
    for i, piece in enumerate(pieces):
        token = gpt2.encode(piece)[0]
        out.append(
            Event(
                piece,
                token=token,
                logprob=-0.5 * (i + 1),
                top_logprobs=[(token, -0.5 * (i + 1)), (13, -3.0)],
            )
        )
    out[-1].finish_reason, out[-1].prompt_tokens, out[-1].completion_tokens = (
        "length",
        2,
        len(pieces),
    )
    return out


def test_choice_accumulates_and_logprob_objects(gpt2):
    choice = Choice(0)
    for event in events_for(gpt2, [" dog", " ran"]):
        choice.add(event)
    assert ("".join(choice.text), choice.finish_reason, choice.completion_tokens) == (
        " dog ran",
        "length",
        2,
    )
    lp = convert.completion_logprobs(choice, gpt2, prompt=[464], start=0)
    assert lp == {
        "tokens": ["The", " dog", " ran"],
        "token_logprobs": [None, -0.5, -1.0],
        "top_logprobs": [None, {" dog": -0.5, ".": -3.0}, {" ran": -1.0, ".": -3.0}],
        "text_offset": [0, 3, 7],
    }
    content = convert.chat_logprobs(choice, gpt2)["content"]
    assert content[0] == {
        "token": " dog",
        "logprob": -0.5,
        "bytes": [32, 100, 111, 103],
        "top_logprobs": [
            {"token": " dog", "logprob": -0.5, "bytes": [32, 100, 111, 103]},
            {"token": ".", "logprob": -3.0, "bytes": [46]},
        ],
    }


def test_engine_failures_map_to_http_errors():
    assert convert.engine_failure("stop", timeout=5) is None
    assert convert.engine_failure("length", timeout=5) is None
    timeout = convert.engine_failure("timeout", timeout=5)
    assert timeout.status == 504 and "5 s" in timeout.message
    assert convert.engine_failure("error", timeout=5).status == 500


def test_chunks_and_sse():
    meta = dict(id="x", created=1, model="m")
    assert convert.sse("[DONE]") == b"data: [DONE]\n\n"
    assert convert.sse({"a": "é"}) == 'data: {"a": "é"}\n\n'.encode()
    first = convert.chat_chunk(
        **meta, choices=[convert.chat_delta(0, role="assistant", content="")], include_usage=True
    )
    assert (
        first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        and first["usage"] is None
    )
    last = convert.chat_chunk(**meta, choices=[], usage=convert.usage(3, 4))
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert "usage" not in convert.chat_chunk(**meta, choices=[])
    chunk = convert.completion_chunk(
        **meta, choices=[convert.completion_choice(1, "a", logprobs=None, finish_reason="stop")]
    )
    assert chunk["object"] == "text_completion" and chunk["choices"][0] == {
        "index": 1,
        "text": "a",
        "logprobs": None,
        "finish_reason": "stop",
    }


def test_embedding_response_and_base64():
    floats = convert.embedding_response(
        [[1.0, -2.5]], model="m", prompt_tokens=3, encoding_format="float"
    )
    assert floats["data"][0] == {"object": "embedding", "index": 0, "embedding": [1.0, -2.5]}
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    packed = convert.embedding_response(
        [[1.0, -2.5]], model="m", prompt_tokens=3, encoding_format="base64"
    )
    assert struct.unpack("<2f", base64.b64decode(packed["data"][0]["embedding"])) == (1.0, -2.5)


def test_prometheus_text():
    text = convert.prometheus({"requests": 3, "queue_depth": 0, "tokens_per_second": 12.5})
    assert text == (
        "# HELP pocketlm_requests_total Generation requests accepted (one per choice).\n"
        "# TYPE pocketlm_requests_total counter\npocketlm_requests_total 3\n"
        "# HELP pocketlm_queue_depth Requests waiting for a batch slot.\n"
        "# TYPE pocketlm_queue_depth gauge\npocketlm_queue_depth 0\n"
        "# HELP pocketlm_tokens_per_second Tokens generated per second, last 10 s.\n"
        "# TYPE pocketlm_tokens_per_second gauge\npocketlm_tokens_per_second 12.5\n"
    )
