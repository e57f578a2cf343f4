"""Chat templates rendered by pocketlm against transformers' `apply_chat_template`.

Three real-style templates: SmolLM2's (from the embedded GGUF), a Llama 3 Instruct style one
(BOS variable, `trim`), and a Qwen2.5 style one (tools as JSON, tool calls, `namespace`,
`raise_exception`, a template variable). The oracle for the written templates is transformers
loading the same folder. Also: the sandbox refuses to reach Python internals.
"""

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import pocketlm.tokenizer as tokenizer_module
from pocketlm.errors import PocketLMError
from pocketlm.tokenizer import Tokenizer

GPT2_DATA = Path(__file__).parents[1] / "src" / "pocketlm" / "data" / "gpt2"

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN_TEMPLATE = """{%- set ns = namespace(system='You are a helpful assistant.') %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] %}
{%- endif %}
{{- '<|im_start|>system\\n' + ns.system }}
{%- if tools %}
    {{- "\\n\\n# Tools\\n\\nYou may call functions. Their signatures:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}{{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>" }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- elif message.role == 'system' and not loop.first %}
        {{- raise_exception('The system message must come first') }}
    {%- elif message.role == 'system' %}
        {%- continue %}
    {%- elif message.role == 'assistant' and message.tool_calls is defined %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for call in message.tool_calls %}
            {{- '\\n<tool_call>\\n' + call.function | tojson + '\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""

SYSTEM = {"role": "system", "content": "You are terse. Answer in one line."}
TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "  And of Japan? Answer with 日本語 too 🗾  "},
]
CONVERSATIONS = {
    "one-user": TURNS[:1],
    "system-user": [SYSTEM, *TURNS[:1]],
    "multi-turn": TURNS,
    "system-multi-turn": [SYSTEM, *TURNS],
    "ends-with-assistant": TURNS[:2],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather <now> in a city, e.g. Zürich",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,  # as OpenAI clients send it; transformers drops None values
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
            }
        ],
    },
    {"role": "tool", "content": '{"temp": "12°C"}'},
]

# Llama 3's and Qwen's special tokens, added after GPT-2's 50,257 so that one small vocab
# serves both written templates (the template text is what is under test).
ADDED = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
ADDED += ["<|im_start|>", "<|im_end|>"]


def _write_folder(folder: Path, template: str, **config) -> Path:
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(GPT2_DATA / name, folder / name)
    decoder = {
        str(50257 + i): {
            "content": t,
            "special": True,
            "normalized": False,
            "lstrip": False,
            "rstrip": False,
        }
        for i, t in enumerate(ADDED)
    }
    config = {"tokenizer_class": "GPT2Tokenizer", "added_tokens_decoder": decoder, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, **config}))
    return folder


@pytest.fixture(scope="module")
def smollm(smollm2_metadata) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_metadata)


@pytest.fixture(scope="module")
def smollm_hf(smollm2_gguf):
    oracle = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    assert oracle.chat_template and "<|im_start|>" in oracle.chat_template
    return oracle


@pytest.fixture(scope="module", params=["llama3", "qwen"])
def written(request, tmp_path_factory):
    """(pocketlm tokenizer, transformers tokenizer) for one written template folder."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llama3":
        _write_folder(
            folder, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
        )
    else:
        _write_folder(folder, QWEN_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    oracle = AutoTokenizer.from_pretrained(folder)
    assert oracle.encode("Hello world") == [15496, 995]
    assert oracle.convert_tokens_to_ids(ADDED) == list(range(50257, 50257 + len(ADDED)))
    return Tokenizer.from_dir(folder), oracle


def _hf_render(oracle, messages, **kwargs) -> str:
    text = oracle.apply_chat_template(messages, tokenize=False, **kwargs)
    assert isinstance(text, str) and text  # an oracle that renders nothing proves nothing
    return text


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_smollm_template_matches_transformers(smollm, smollm_hf, name, generation_prompt):
    messages = CONVERSATIONS[name]
    expected = _hf_render(smollm_hf, messages, add_generation_prompt=generation_prompt)
    assert smollm.render_chat(messages, add_generation_prompt=generation_prompt) == expected


def test_smollm_template_text_by_hand(smollm):
    assert smollm.render_chat([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_smollm_rendered_chat_encodes_like_transformers(smollm, smollm_hf):
    text = smollm.render_chat(CONVERSATIONS["system-multi-turn"])
    ids = smollm.encode(text, add_bos=False)
    assert ids == smollm_hf.apply_chat_template(
        CONVERSATIONS["system-multi-turn"], add_generation_prompt=True, return_dict=False
    )
    assert ids.count(1) == 5  # one <|im_start|> per message (4) and the generation prompt


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_written_templates_match_transformers(written, name, generation_prompt):
    tok, oracle = written
    messages = CONVERSATIONS[name]
    expected = _hf_render(oracle, messages, add_generation_prompt=generation_prompt)
    assert tok.render_chat(messages, add_generation_prompt=generation_prompt) == expected
    assert tok.encode(expected, add_bos=False) == oracle.encode(expected, add_special_tokens=False)


def test_written_folders_special_tokens(written):
    tok, oracle = written
    assert tok.special_tokens == oracle.special_tokens_map
    # eos_token, plus every end-of-turn special the vocabulary has (as llama.cpp stops on):
    # <|endoftext|>, <|eot_id|> and <|im_end|>.
    assert tok.eos_ids == frozenset({50256, 50260, 50262})
    if "bos_token" in oracle.special_tokens_map and oracle.bos_token == "<|begin_of_text|>":
        assert tok.bos_id == 50257
        assert tok.render_chat(TURNS[:1]).startswith(
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        )


def test_tools_and_template_variables_match_transformers(tmp_path):
    folder = _write_folder(tmp_path, QWEN_TEMPLATE, eos_token="<|im_end|>")
    tok, oracle = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    for kwargs in ({"tools": TOOLS}, {"tools": TOOLS, "enable_thinking": False}, {}):
        expected = _hf_render(oracle, TOOL_CONVERSATION, add_generation_prompt=True, **kwargs)
        assert tok.render_chat(TOOL_CONVERSATION, **kwargs) == expected
    rendered = tok.render_chat(TOOL_CONVERSATION, tools=TOOLS)
    assert '"Weather <now> in a city, e.g. Zürich"' in rendered  # tojson: no HTML escapes, no \\u


def test_raise_exception_becomes_a_pocketlm_error(tmp_path):
    tok = Tokenizer.from_dir(_write_folder(tmp_path, QWEN_TEMPLATE))
    with pytest.raises(PocketLMError, match="Unknown role: robot"):
        tok.render_chat([{"role": "robot", "content": "beep"}])
    with pytest.raises(PocketLMError, match="system message must come first"):
        tok.render_chat([*TURNS[:1], SYSTEM])
    two_lines = Tokenizer.from_dir(
        _write_folder(tmp_path, "{{ raise_exception('first\\nsecond') }}")
    )
    with pytest.raises(PocketLMError, match="first second") as caught:
        two_lines.render_chat(TURNS)
    assert "\n" not in str(caught.value)  # user-facing errors are one line


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{% set x = messages.append(1) %}{{ messages }}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}{{ ns }}",
        "{{ namespace(_secret=1) }}",
    ],
)
def test_sandbox_refuses_python_internals(tmp_path, template):
    tok = Tokenizer.from_dir(_write_folder(tmp_path, template))
    with pytest.raises(PocketLMError, match="chat template"):
        tok.render_chat(TURNS)


def test_sandbox_renders_unsafe_attributes_as_nothing(tmp_path):
    template = "[{{ raise_exception.__globals__ }}][{{ ''.__class__ }}][{{ messages.pop }}]"
    tok = Tokenizer.from_dir(_write_folder(tmp_path, template))
    assert tok.render_chat(TURNS) == "[][][]"


def test_template_helpers(tmp_path):
    template = (
        "{{ strftime_now('%Y') }}|{{ dict(a=1) | tojson }}|{% for m in messages %}"
        "{% if loop.index > 1 %}{% break %}{% endif %}{% generation %}{{ m.content }}{% endgeneration %}"
        "{% endfor %}|{{ eos_token }}|{{ custom }}"
    )
    folder = _write_folder(tmp_path, template, eos_token="<|im_end|>")
    tok, oracle = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    rendered = tok.render_chat(TURNS, custom=[1, "x"])
    assert rendered == _hf_render(oracle, TURNS, add_generation_prompt=True, custom=[1, "x"])
    assert rendered.startswith(datetime.now().strftime("%Y") + '|{"a": 1}|What is')


def test_template_is_compiled_once(tmp_path, monkeypatch):
    compiled = []
    real = tokenizer_module._compile_template
    monkeypatch.setattr(
        tokenizer_module, "_compile_template", lambda s: compiled.append(s) or real(s)
    )
    tok = Tokenizer.from_dir(
        _write_folder(tmp_path, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>")
    )
    assert tok.render_chat(TURNS) == tok.render_chat(TURNS)
    assert len(compiled) == 1


def test_template_sources_in_a_folder(tmp_path):
    _write_folder(
        tmp_path, [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    )
    assert Tokenizer.from_dir(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_dir(tmp_path).render_chat(TURNS) == "J3"


def test_no_chat_template_is_a_clear_error():
    with pytest.raises(PocketLMError, match="no chat template"):
        Tokenizer.gpt2().render_chat(TURNS)


def test_invalid_template_is_a_clear_error(tmp_path):
    tok = Tokenizer.from_dir(_write_folder(tmp_path, "{% for m in messages %}"))
    with pytest.raises(PocketLMError, match="not valid Jinja"):
        tok.render_chat(TURNS)
