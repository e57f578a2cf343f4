"""Tool calling through `pocketlm serve` on 127.0.0.1 with the official `openai` client and
the embedded default model (SmolLM2-135M-Instruct, whose template has no tools: the default
`<tool_call>` format). Each tool_choice mode, streamed and not: the calls' arguments
validate (`jsonschema`), and the streamed deltas reassemble to the non-streamed reply of
the same seed. A tool result goes back as a `role: "tool"` message; bad requests are 400s.
The same server answers Anthropic's tool use (tool_use / tool_result blocks) through the
official `anthropic` client: its stream accumulates to the non-streamed message.
"""

import json

import anthropic
import jsonschema
import openai
import pytest

from test_serve_api import MODEL, Server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
CONVERT = {
    "type": "function",
    "function": {
        "name": "convert",
        "description": "Convert an amount of money.",
        "parameters": {
            "type": "object",
            "properties": {
                "amount": {"type": "number", "minimum": 0, "maximum": 1000},
                "to": {"enum": ["EUR", "USD", "JPY"]},
            },
            "required": ["amount", "to"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, CONVERT]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]
NAMED = {"type": "function", "function": {"name": "convert"}}


@pytest.fixture(scope="module")
def server(smollm2_stored):
    # No prompt cache: a prompt computed whole every time, so a seed's sample does not
    # depend on which earlier test's request left which blocks cached (a quantized model's
    # split prefill rounds otherwise); the seeds below were chosen so.
    server = Server(smollm2_stored, max_batch=4, timeout=120, cache_ram=0)
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def ask(client, *, stream=False, seed=1, **options):
    # One call unless a test asks for more: a 135M model given room for several calls
    # goes on making them until max_tokens.
    options = {
        "model": MODEL,
        "messages": ASK,
        "tools": TOOLS,
        "max_tokens": 60,
        "parallel_tool_calls": False,
        **options,
    }
    if not stream:
        choice = client.chat.completions.create(seed=seed, **options).choices[0]
        calls = [
            (c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []
        ]
        return choice.message.content, calls, choice.finish_reason
    content, calls, finish = [], {}, None
    for chunk in client.chat.completions.create(seed=seed, stream=True, **options):
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        for piece in delta.tool_calls or []:
            if piece.id is not None:  # the first piece of a call: id, name
                assert piece.index == len(calls) and piece.type == "function"
                calls[piece.index] = [piece.id, piece.function.name, ""]
            calls[piece.index][2] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return "".join(content) or None, [tuple(c) for c in calls.values()], finish


def valid(calls, names=tuple(SCHEMAS), *, finish="tool_calls"):
    """Every call names a tool and its arguments validate (but the last call of a reply
    cut short by max_tokens, which may be cut too)."""
    for call_id, name, arguments in calls if finish != "length" else calls[:-1]:
        assert call_id.startswith("call_") and name in names
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    return True


@pytest.mark.parametrize(("choice", "seed"), [("required", 1), ("named", 2)])
def test_required_and_named_give_valid_calls_streamed_as_not(client, choice, seed):
    tool_choice = NAMED if choice == "named" else "required"
    content, calls, finish = ask(client, tool_choice=tool_choice, seed=seed)
    names = ("convert",) if choice == "named" else tuple(SCHEMAS)
    assert content is None and finish == "tool_calls" and valid(calls, names)
    assert len(calls) == 1  # parallel_tool_calls false (ask's default)
    streamed = ask(client, tool_choice=tool_choice, seed=seed, stream=True)
    assert streamed[0] is None and streamed[2] == "tool_calls"
    assert [c[1:] for c in streamed[1]] == [c[1:] for c in calls]  # ids are new each time


def test_parallel_tool_calls_true_allows_several(client):
    _, calls, finish = ask(client, tool_choice="required", parallel_tool_calls=True, seed=0)
    assert len(calls) >= 2 and valid(calls, finish=finish)


# These seeds take each branch of auto with SmolLM2 (one torch thread, no prompt cache): a
# call that the grammar holds to the schema once "<tool_call>" is written; text alone.
@pytest.mark.parametrize(("seed", "calls_tool"), [(65, True), (24, False)])
def test_auto_gives_text_or_valid_calls_streamed_as_not(client, seed, calls_tool):
    content, calls, finish = ask(client, tool_choice="auto", seed=seed, max_tokens=100)
    assert (content or calls) and bool(calls) == calls_tool and valid(calls)
    assert finish == ("tool_calls" if calls_tool else "stop")
    streamed = ask(client, tool_choice="auto", seed=seed, max_tokens=100, stream=True)
    assert (streamed[0], streamed[2]) == (content, finish)
    assert [c[1:] for c in streamed[1]] == [c[1:] for c in calls]


def test_n_choices_each_call_on_their_own(client):
    """n=2 in one batch: each choice its own grammar state and parser; choice 1 is what
    seed + 1 gives alone (the server's rule for n)."""
    options = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=60)
    both = client.chat.completions.create(model=MODEL, messages=ASK, n=2, seed=7, **options)
    alone = ask(client, seed=8, **options)
    for choice in both.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls
        assert len(calls) == 1 and valid(
            [(c.id, c.function.name, c.function.arguments) for c in calls]
        )
    second = both.choices[1].message.tool_calls[0].function
    assert [(second.name, second.arguments)] == [c[1:] for c in alone[1]]


def test_none_gives_text_and_no_calls(client):
    for stream in (False, True):
        content, calls, finish = ask(client, tool_choice="none", stream=stream, max_tokens=12)
        assert calls == [] and content and finish in ("stop", "length")


def test_a_tool_result_goes_back_to_the_model(client):
    _, calls, _ = ask(client, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call_id, name, arguments = calls[0]
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": '{"sky": "sunny", "max": 24}'},
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=16, seed=0
    ).choices[0]
    assert reply.message.content and not reply.message.tool_calls


@pytest.mark.parametrize(
    ("options", "param", "message"),
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "'nope'",
        ),
        ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ]
            },
            "tools.0.function.parameters",
            "type object",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "type": "object",
                                "properties": {"x": {"type": "array", "uniqueItems": True}},
                            },
                        },
                    }
                ]
            },
            "tools",
            "uniqueItems",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools", "two tools"),
    ],
    ids=["unknown-name", "no-tools", "not-an-object", "unsupported-keyword", "duplicate"],
)
def test_bad_tool_requests_are_400s(client, options, param, message):
    options = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 4, **options}
    if options["tools"] is None:
        del options["tools"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**options)
    body = caught.value.body
    assert body["type"] == "invalid_request_error" and body["param"] == param
    assert message in body["message"] and "\n" not in body["message"]


# -- Anthropic's Messages API: the same machinery under Anthropic's shapes -----------------


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)


CLAUDE_TOOLS = [
    {
        "name": t["function"]["name"],
        "description": t["function"]["description"],
        "input_schema": t["function"]["parameters"],
    }
    for t in TOOLS
]


def ask_claude(claude, *, stream=False, seed=1, **options):
    """The reply's content blocks as plain dicts and its stop reason; streamed, as the
    client's `messages.stream` accumulates them (and the raw event types, checked here)."""
    options = {
        "model": MODEL,
        "max_tokens": 60,
        "messages": ASK,
        "tools": CLAUDE_TOOLS,
        "extra_body": {"seed": seed},
        **options,
    }
    if not stream:
        reply = claude.messages.create(**options)
        return [b.model_dump(exclude_none=True) for b in reply.content], reply.stop_reason
    with claude.messages.stream(**options) as events:
        kinds = [e.type for e in events if e.type != "text" and e.type != "input_json"]
        reply = events.get_final_message()
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    starts = [i for i, k in enumerate(kinds) if k == "content_block_start"]
    stops = [i for i, k in enumerate(kinds) if k == "content_block_stop"]
    assert len(starts) == len(stops) == len(reply.content)
    assert all(a < b for a, b in zip(starts, stops, strict=True))
    return [b.model_dump(exclude_none=True) for b in reply.content], reply.stop_reason


def tool_uses(blocks, names=tuple(SCHEMAS)):
    """The tool_use blocks, each checked: a toolu_ id, a known name, input valid under
    its input_schema."""
    uses = [b for b in blocks if b["type"] == "tool_use"]
    for use in uses:
        assert use["id"].startswith("toolu_") and use["name"] in names
        jsonschema.validate(use["input"], SCHEMAS[use["name"]])
    return uses


@pytest.mark.parametrize(
    ("choice", "seed"),
    [
        ({"type": "any", "disable_parallel_tool_use": True}, 1),
        ({"type": "tool", "name": "convert", "disable_parallel_tool_use": True}, 2),
    ],
    ids=["any", "tool"],
)
def test_anthropic_tool_use_streamed_as_not(claude, choice, seed):
    blocks, reason = ask_claude(claude, tool_choice=choice, seed=seed)
    names = ("convert",) if choice["type"] == "tool" else tuple(SCHEMAS)
    uses = tool_uses(blocks, names)
    assert reason == "tool_use" and len(uses) == 1 and blocks == uses  # one call, no text
    streamed, streamed_reason = ask_claude(claude, tool_choice=choice, seed=seed, stream=True)
    assert streamed_reason == "tool_use"
    strip = lambda bs: [{k: v for k, v in b.items() if k != "id"} for b in bs]  # noqa: E731
    assert strip(streamed) == strip(blocks)  # ids are new each time


def test_anthropic_tool_result_round_trip_and_none(claude, smollm2_stored):
    named = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    blocks, _ = ask_claude(claude, tool_choice=named)
    (use,) = tool_uses(blocks)
    turns = [
        *ASK,
        {"role": "assistant", "content": [use]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": use["id"],
                    "content": [{"type": "text", "text": '{"sky": "sunny", "max": 24}'}],
                },
                {"type": "text", "text": "Thanks! Summarize it."},
            ],
        },
    ]
    ask = dict(model=MODEL, messages=turns, tools=CLAUDE_TOOLS)
    # the prompt: the default section, the call as the model writes one, the result block
    # and the user's words, as the OpenAI route renders the same conversation
    counted = claude.messages.count_tokens(**ask).input_tokens
    call = json.dumps({"name": use["name"], "arguments": use["input"]})
    result = json.dumps({"name": use["name"], "content": '{"sky": "sunny", "max": 24}'})
    expected = smollm2_stored.tokenizer.render_chat(
        [
            {"role": "system", "content": tools_section()},
            *ASK,
            {"role": "assistant", "content": f"<tool_call>\n{call}\n</tool_call>"},
            {"role": "user", "content": f"<tool_response>\n{result}\n</tool_response>"},
            {"role": "user", "content": "Thanks! Summarize it."},
        ],
        add_generation_prompt=True,
    )
    assert counted == len(smollm2_stored.tokenizer.encode(expected, add_bos=False))
    reply = claude.messages.create(
        **ask, max_tokens=12, tool_choice={"type": "none"}, extra_body={"seed": 0}
    )
    assert [b.type for b in reply.content] == ["text"] and reply.content[0].text
    assert reply.stop_reason in ("end_turn", "max_tokens")


def tools_section():
    from pocketlm.prompting.tools import DEFAULT_SECTION

    return DEFAULT_SECTION.format(tools="\n".join(json.dumps(t) for t in TOOLS))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tool_choice": {"type": "tool", "name": "nope"}}, "'nope'"),
        ({"tools": None, "tool_choice": {"type": "any"}}, "needs tools"),
        ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]}, 'type": "object'),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
        ({"tools": [CLAUDE_TOOLS[0], CLAUDE_TOOLS[0]]}, "two tools"),
        (
            {"messages": [*ASK, {"role": "assistant", "content": [{"type": "tool_use"}]}]},
            "needs an id, a name and an input object",
        ),
    ],
    ids=["unknown-name", "no-tools", "not-an-object", "server-tool", "duplicate", "bad-tool-use"],
)
def test_anthropic_bad_tool_requests_are_400s(claude, options, message):
    options = {"model": MODEL, "messages": ASK, "tools": CLAUDE_TOOLS, "max_tokens": 4, **options}
    if options["tools"] is None:
        del options["tools"]
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(**options)
    assert caught.value.body["type"] == "error"
    error = caught.value.body["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"]


# -- the README's client examples -----------------------------------------------------------


def test_the_readmes_three_client_examples_print_the_models_greedy_answer(
    server, smollm2_stored, capsys
):
    """The README's openai, ollama and anthropic examples, run as written (only the address
    changed) against this server: each prints the answer `lm.generate` gives greedily."""
    from test_user_guide import code_blocks

    examples = [b for b in code_blocks("python") if "127.0.0.1:8000" in b]
    assert [next(c for c in ("openai", "ollama", "anthropic") if c in b) for b in examples] == [
        "openai",
        "ollama",
        "anthropic",
    ]
    lm = smollm2_stored
    question = [{"role": "user", "content": "What is the capital of Japan?"}]
    ids = lm.tokenizer.encode(
        lm.tokenizer.render_chat(question, add_generation_prompt=True), add_bos=False
    )
    answer = lm.generate(ids, max_tokens=256, temperature=0.0).text
    assert "Tokyo" in answer
    for example in examples:
        exec(example.replace("http://127.0.0.1:8000", server.url), {})  # noqa: S102 - our README
        assert capsys.readouterr().out.strip() == answer.strip(), example
