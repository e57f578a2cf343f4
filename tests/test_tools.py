"""Tool calling below the server: each format's parser (whole and streamed piece by piece,
tags split anywhere), the prompt with real chat templates against transformers'
`apply_chat_template(..., tools=...)`, and the grammars through pocketlm's constraint
(llguidance) on the GPT-2 vocabulary: calls valid under the schemas pass, others are refused.
"""

import json
import random
from pathlib import Path

import pytest

import vendor
from pocketlm.errors import PocketLMError
from pocketlm.generate.constraint import Grammar
from pocketlm.prompting import tools
from pocketlm.prompting.toolcalls import ToolCallDelta, ToolCallParser, assemble, parse
from pocketlm.tokenizer import Tokenizer

GPT2_DATA = Path(__file__).parents[1] / "src" / "pocketlm" / "data" / "gpt2"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather now in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
TOOLS = [WEATHER, NOW]
PARIS = {"city": "Paris", "unit": "celsius"}
TOKYO = {"city": '東京 "x" }', "unit": "fahrenheit", "days": 3}


def calls(*pairs):
    return [(name, args) for name, args in pairs]


# -- parsing: (format, model output, expected content, expected calls) --

CASES = {
    "hermes": (
        tools.HERMES,
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": '
        + json.dumps(PARIS)
        + '}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
        + json.dumps(TOKYO, ensure_ascii=False)
        + "}\n</tool_call>",
        "Let me look.",
        calls(("get_weather", PARIS), ("get_weather", TOKYO)),
    ),
    "smollm2-list": (
        tools.DEFAULT,
        '<tool_call>[{"name": "now", "arguments": {}}, {"arguments": '
        + json.dumps(PARIS)
        + ', "name": "get_weather"}]</tool_call>',
        "",
        calls(("now", {}), ("get_weather", PARIS)),
    ),
    "llama3-bare": (
        tools.LLAMA3,
        '\n{"name": "get_weather", "parameters": ' + json.dumps(PARIS) + "}",
        "",
        calls(("get_weather", PARIS)),
    ),
    "llama3-python-tag": (
        tools.LLAMA3,
        '<|python_tag|>{"name": "now", "parameters": {}}; {"name": "get_weather", '
        '"parameters": ' + json.dumps(TOKYO) + "}",
        "",
        calls(("now", {}), ("get_weather", TOKYO)),
    ),
    "llama3-json-answer": (
        tools.LLAMA3,
        '{"answer": 42} is the JSON.',
        '{"answer": 42} is the JSON.',
        [],
    ),
    "mistral-list": (
        tools.MISTRAL,
        '[TOOL_CALLS][{"name": "get_weather", "arguments": '
        + json.dumps(PARIS)
        + '}, {"name": "now", "arguments": {}, "id": "abcdefghi"}]',
        "",
        calls(("get_weather", PARIS), ("now", {})),
    ),
    "mistral-args": (
        tools.MISTRAL_ARGS,
        "[TOOL_CALLS]get_weather[ARGS]"
        + json.dumps(TOKYO)
        + "[TOOL_CALLS]now[CALL_ID]abcdefghi[ARGS]{}",
        "",
        calls(("get_weather", TOKYO), ("now", {})),
    ),
    "hermes-broken-json": (  # an unconstrained model's slip: the call ends at its tag
        tools.HERMES,
        '<tool_call>{"name": "now", "arguments": {"a": 1}, oops}</tool_call> Done.',
        "Done.",
        calls(("now", {"a": 1})),
    ),
    "text-with-lookalikes": (
        tools.HERMES,
        "Use <b>, <tool or <tool_cal; [TOOL] {not a call}.",
        "Use <b>, <tool or <tool_cal; [TOOL] {not a call}.",
        [],
    ),
}


def _parsed(events):
    content, found = assemble(events)
    return content, [(c.name, json.loads(c.arguments)) for c in found]


@pytest.mark.parametrize("case", list(CASES))
def test_parser_reads_each_format_whole_and_in_every_split(case):
    fmt, text, content, expected = CASES[case]
    whole = parse(text, fmt)
    assert (whole[0], [(c.name, json.loads(c.arguments)) for c in whole[1]]) == (content, expected)
    for seed in range(12):  # random splits, and one character at a time
        rng = random.Random(seed)
        sizes = [1] * len(text) if seed == 0 else [rng.randint(1, 6) for _ in text]
        parser, events, at = ToolCallParser(fmt), [], 0
        for size in sizes:
            if at >= len(text):
                break
            got = parser.feed(text[at : at + size])
            at += size
            for event in got:  # no piece of a tag ever shows as content
                if isinstance(event, str) and expected:
                    assert not any(t[:2] in event for t in fmt.triggers), event
            events += got
        events += parser.finish()
        assert _parsed(events) == (content, expected)


def test_deltas_are_openai_shaped():
    fmt, text, _, _ = CASES["hermes"]
    ids = iter(["call_a", "call_b"])
    parser = ToolCallParser(fmt, new_id=lambda: next(ids))
    events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
    deltas = [e.wire() for e in events if isinstance(e, ToolCallDelta)]
    # the first delta of a call: index, id, type, name and empty arguments; then fragments
    assert deltas[0] == {
        "index": 0,
        "id": "call_a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert all(set(d) == {"index", "function"} for d in deltas[1:] if "id" not in d)
    starts = [d for d in deltas if "id" in d]
    assert [d["index"] for d in starts] == [0, 1] and starts[1]["id"] == "call_b"
    assert "".join(d["function"]["arguments"] for d in deltas if d["index"] == 1) == json.dumps(
        TOKYO, ensure_ascii=False
    )


def test_a_call_cut_short_keeps_what_came():
    content, found = parse('<tool_call>\n{"name": "now", "arguments": {"a": [1, 2', tools.HERMES)
    assert content == "" and [(c.name, c.arguments) for c in found] == [("now", '{"a": [1, 2')]


# -- rendering with real templates --

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Tokyo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps(PARIS)},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
]
TEMPLATES = {  # template -> (format, bos, eos)
    "Qwen-Qwen2.5-7B-Instruct": (tools.HERMES, None, "<|im_end|>"),
    "Qwen-Qwen3-0.6B": (tools.HERMES, None, "<|im_end|>"),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": (
        tools.HERMES,
        "<|begin_of_text|>",
        "<|im_end|>",
    ),
    "ibm-granite-granite-4.0": (tools.HERMES, None, "<|end_of_text|>"),
    "meta-llama-Llama-3.1-8B-Instruct": (tools.LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "meta-llama-Llama-3.2-3B-Instruct": (tools.LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "mistralai-Mistral-Nemo-Instruct-2407": (tools.MISTRAL, "<s>", "</s>"),
    "Mistral-Small-3.2-24B-Instruct-2506": (tools.MISTRAL_ARGS, "<s>", "</s>"),
    "Qwen3-Coder": (tools.DEFAULT, None, "<|im_end|>"),  # XML-like arguments: not parsed
    "GLM-4.6": (tools.DEFAULT, None, None),
    "google-gemma-2-2b-it": (tools.DEFAULT, "<bos>", "<eos>"),
}
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def backend():
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    backend = Backend(
        models.BPE.from_file(str(GPT2_DATA / "vocab.json"), str(GPT2_DATA / "merges.txt"))
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _pair(template, bos, eos):
    """pocketlm's and transformers' tokenizers with `template` (over a 3-token vocabulary:
    the rendered text does not depend on it, and a small one builds in milliseconds)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models
    from transformers import PreTrainedTokenizerFast

    backend = Backend(models.BPE({"a": 0, "b": 1, "<unk>": 2}, [], unk_token="<unk>"))

    named = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    oracle = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **named)
    tok = Tokenizer(backend, eos_ids=frozenset(), chat_template=template, special_tokens=named)
    return tok, oracle


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_templates_render_tools_calls_and_results_as_transformers_does(name):
    fmt, bos, eos = TEMPLATES[name]
    template = (vendor.llama_cpp() / "models" / "templates" / f"{name}.jinja").read_text()
    assert tools.tool_format(template) == fmt
    tok, oracle = _pair(template, bos, eos)
    conversation = CONVERSATION[1:] if "gemma" in name else CONVERSATION  # no system role
    got = tools.render(tok.render_chat, conversation, fmt, [WEATHER])
    assert "Paris" in got and "temp" in got
    if not fmt.in_template:  # the default section, and the call written out in it
        assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in got
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"' in got
        return
    # The oracle gets what transformers documents: arguments as a dict (OpenAI sends JSON
    # text), the same ids (Mistral's templates want 9 characters).
    messages = json.loads(json.dumps(conversation))
    messages[2]["content"] = ""
    messages[2]["tool_calls"][0]["function"]["arguments"] = PARIS
    if fmt in (tools.MISTRAL, tools.MISTRAL_ARGS):
        call_id = tools._mistral_id("call_1")
        messages[2]["tool_calls"][0]["id"] = messages[3]["tool_call_id"] = call_id
    expected = oracle.apply_chat_template(
        messages, tools=[WEATHER], tokenize=False, add_generation_prompt=True
    )
    assert got == expected


def test_default_section_for_a_template_without_tools():
    """SmolLM2's own template (as in its GGUF): the tools as JSON lines in a system turn,
    earlier calls in the default format, results as a user turn."""
    tok, oracle = _pair(SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>")
    assert tools.tool_format(SMOLLM2_TEMPLATE) == tools.DEFAULT
    got = tools.render(tok.render_chat, CONVERSATION[1:], tools.DEFAULT, TOOLS)
    section = tools.DEFAULT_SECTION.format(tools=json.dumps(WEATHER) + "\n" + json.dumps(NOW))
    expected = (
        f"<|im_start|>system\n{section}<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Tokyo?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "celsius"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"name": "get_weather", "content": '
        '"{\\"temp\\": 21}"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    )
    assert got == expected
    chat, _ = tools.chat_messages(CONVERSATION[1:], tools.DEFAULT, TOOLS)
    assert oracle.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == got


def test_earlier_arguments_that_are_not_json_are_refused():
    bad = json.loads(json.dumps(CONVERSATION))
    bad[2]["tool_calls"][0]["function"]["arguments"] = "{city: Paris"
    with pytest.raises(PocketLMError, match="arguments of the earlier call to 'get_weather'"):
        tools.chat_messages(bad, tools.HERMES, [WEATHER])


# -- grammars, through the engine's constraint --


@pytest.fixture(scope="module")
def gpt2(backend):
    return Tokenizer(backend, eos_ids=frozenset({50256}))


def _follows(tokenizer, lark, text) -> bool:
    """Whether the grammar lets the model write `text` (as the tokenizer splits it) and end."""
    state = Grammar.lark(lark).bind(tokenizer, vocab_size=tokenizer.vocab_size).start()
    try:
        for token in tokenizer.encode(text, add_bos=False):
            if not state.allowed("cpu")[token]:
                return False
            state.accept(token)
        return bool(state.allowed("cpu")[50256]) or state.done
    except PocketLMError:
        return False


def _hermes(name, args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


GOOD, BAD = _hermes("get_weather", PARIS), _hermes("get_weather", {"city": "Paris", "unit": "K"})
GRAMMAR_CASES = [  # (format, choice, parallel, text, allowed)
    (tools.DEFAULT, "required", False, GOOD, True),
    (tools.DEFAULT, "required", False, BAD, False),  # not in the enum
    (tools.DEFAULT, "required", False, _hermes("get_weather", {"city": "Paris"}), False),
    (tools.DEFAULT, "required", False, _hermes("get_weather", {**PARIS, "days": 9}), False),
    (tools.DEFAULT, "required", False, _hermes("nope", {}), False),
    (tools.DEFAULT, "required", False, "Sure!", False),
    (tools.DEFAULT, "required", False, GOOD + "\n" + _hermes("now", {}), False),
    (tools.DEFAULT, "required", True, GOOD + "\n" + _hermes("now", {}), True),
    (tools.DEFAULT, "now", True, GOOD, False),
    (tools.DEFAULT, "now", True, _hermes("now", {"any": 1}), True),
    (tools.DEFAULT, "auto", False, "It is sunny.", True),
    (tools.DEFAULT, "auto", False, GOOD, True),
    (tools.DEFAULT, "auto", False, "Checking.\n" + GOOD, True),
    (tools.DEFAULT, "auto", False, "Checking.\n" + BAD, False),  # once begun, held to it
    (tools.LLAMA3, "required", False, json.dumps({"name": "now", "parameters": {}}), True),
    (tools.LLAMA3, "auto", False, "Hi!", True),
    (tools.LLAMA3, "auto", False, json.dumps({"name": "get_weather", "parameters": {}}), False),
    (
        tools.MISTRAL,
        "required",
        True,
        "[TOOL_CALLS]" + json.dumps([{"name": "now", "arguments": {}}] * 2),
        True,
    ),
    (
        tools.MISTRAL_ARGS,
        "get_weather",
        True,
        "[TOOL_CALLS]get_weather[ARGS]" + json.dumps(PARIS),
        True,
    ),
    (tools.MISTRAL_ARGS, "get_weather", True, "[TOOL_CALLS]now[ARGS]{}", False),
]


@pytest.mark.parametrize(
    ("fmt", "choice", "parallel", "text", "allowed"),
    GRAMMAR_CASES,
    ids=[f"{c[0].name}-{c[1]}-{n}" for n, c in enumerate(GRAMMAR_CASES)],
)
def test_grammar_holds_calls_to_the_schemas(gpt2, fmt, choice, parallel, text, allowed):
    lark = tools.tool_grammar(fmt, TOOLS, choice=choice, parallel=parallel)
    assert _follows(gpt2, lark, text) == allowed
    if allowed and choice != "auto":  # what the grammar lets through, the parser reads
        content, found = parse(text, fmt)
        assert content == "" and found and all(json.loads(c.arguments) is not None for c in found)


@pytest.mark.parametrize("fmt", [tools.MISTRAL, tools.MISTRAL_ARGS, tools.HERMES])
def test_special_tokens_in_the_grammar_are_tokens(fmt):
    """Where a tag is a special token of the vocabulary it is written by id (`<[id]>`):
    its text would tokenize differently."""
    special = {"[TOOL_CALLS]": 5, "[ARGS]": 6, "<tool_call>": 7, "</tool_call>": 8}.get
    for choice in ("auto", "required"):
        lark = tools.tool_grammar(fmt, TOOLS, choice=choice, parallel=True, special=special)
        assert "<[5]>" in lark or "<[7]>" in lark
        assert not any(f'"{tag}"' in lark for tag in ("[TOOL_CALLS]", "[ARGS]", "<tool_call>"))
        Grammar.lark(lark)  # valid for llguidance


# -- the wire side (pocketlm.serve.tools), on hand-made replies --


def _tooling():
    from pocketlm.serve.tools import Tooling

    return Tooling(tools.DEFAULT, TOOLS, "auto", True, grammar=None)


def test_a_reply_with_calls_is_an_openai_message():
    from pocketlm.serve.tools import message

    text = CASES["hermes"][1]
    got, finish = message(text, "stop", _tooling())
    assert (
        finish == "tool_calls" and got["content"] == "Let me look." and got["role"] == "assistant"
    )
    assert [(c["type"], c["function"]["name"]) for c in got["tool_calls"]] == [
        ("function", "get_weather")
    ] * 2
    assert json.loads(got["tool_calls"][1]["function"]["arguments"]) == TOKYO
    only_calls, _ = message(_hermes("now", {}), "stop", _tooling())
    assert only_calls["content"] is None  # OpenAI's null when the reply is only calls
    assert message("Hello.", "stop", _tooling()) == (
        {"role": "assistant", "content": "Hello.", "refusal": None},
        "stop",
    )
    assert message(_hermes("now", {}), "length", _tooling())[1] == "length"


def test_streamed_deltas_join_to_the_message():
    from pocketlm.serve.tools import DeltaStream, message

    text = CASES["hermes"][1]
    stream, deltas = DeltaStream(_tooling()), []
    for at in range(0, len(text), 3):
        deltas += stream.deltas(text[at : at + 3], None)
    deltas += stream.deltas("", "stop")
    assert deltas[-1] == {"finish_reason": "tool_calls"}
    content = "".join(d.get("content", "") for d in deltas)
    joined = {}
    for d in deltas:
        for piece in d.get("tool_calls", []):
            entry = joined.setdefault(piece["index"], {"name": None, "arguments": ""})
            entry["name"] = piece["function"].get("name", entry["name"])
            entry["arguments"] += piece["function"]["arguments"]
    whole, _ = message(text, "stop", _tooling())
    assert content == whole["content"]
    assert [joined[i] for i in sorted(joined)] == [
        {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for c in whole["tool_calls"]
    ]


def test_a_base_model_gets_the_section_in_its_transcript(gpt2):
    """No chat template (GPT-2): the section opens the transcript harness, the earlier call
    is the assistant's line and its result the user's next line."""
    from pocketlm.serve.convert import chat_prompt
    from pocketlm.serve.schemas import ChatMessage

    messages = [ChatMessage.model_validate(m) for m in CONVERSATION[1:]]
    ids, stops = chat_prompt(messages, gpt2, tools=[WEATHER])
    text = gpt2.decode(ids)
    assert text.startswith("# Tools\n") and stops == ("\nUser:",)
    assert '\nAssistant: <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"' in text
    assert text.endswith(
        '\nUser: <tool_response>\n{"name": "get_weather", "content": '
        '"{\\"temp\\": 21}"}\n</tool_response>\nAssistant:'
    )
