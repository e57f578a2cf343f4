"""The real chat templates of the model families pocketlm runs (llama.cpp's copies in
models/templates/*.jinja, fetched by vendor.py) rendered by pocketlm exactly as transformers'
`apply_chat_template` renders them, and a template that refuses a conversation surfacing as
one line: `error: ...` in `pocketlm chat`, HTTP 400 in OpenAI's error shape in the server.

The oracle is transformers' PreTrainedTokenizerFast with the same template and the bos/eos
tokens the family's tokenizer_config.json names. Where transformers raises on a
conversation, pocketlm must refuse it with a PocketLMError carrying the same message.
"""

import json
import os
import sys
from pathlib import Path

import openai
import pytest

import pocketlm
import vendor
from checkpoints import make_gpt2
from pocketlm.cli.main import main
from pocketlm.errors import PocketLMError
from pocketlm.tokenizer import Tokenizer
from test_serve_api import MODEL, Server

GPT2_DATA = Path(__file__).parents[1] / "src" / "pocketlm" / "data" / "gpt2"

# template file -> (bos_token, eos_token) as the model's tokenizer_config.json has them
LLAMA3 = ("<|begin_of_text|>", "<|eot_id|>")
MISTRAL = ("<s>", "</s>")
DEEPSEEK = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")
FAMILIES = {
    "Qwen-Qwen3-0.6B": (None, "<|im_end|>"),
    "Qwen-Qwen2.5-7B-Instruct": (None, "<|im_end|>"),
    "Qwen-QwQ-32B": (None, "<|im_end|>"),
    "meta-llama-Llama-3.1-8B-Instruct": LLAMA3,
    "meta-llama-Llama-3.2-3B-Instruct": LLAMA3,
    "meta-llama-Llama-3.3-70B-Instruct": LLAMA3,
    "mistralai-Mistral-Nemo-Instruct-2407": MISTRAL,
    "Mistral-Small-3.2-24B-Instruct-2506": MISTRAL,
    "unsloth-mistral-Devstral-Small-2507": MISTRAL,
    "google-gemma-2-2b-it": ("<bos>", "<eos>"),
    "google-gemma-4-31B-it": ("<bos>", "<eos>"),
    "microsoft-Phi-3.5-mini-instruct": ("<s>", "<|endoftext|>"),
    "openai-gpt-oss-120b": ("<|startoftext|>", "<|return|>"),
    "HuggingFaceTB-SmolLM3-3B": (None, "<|im_end|>"),
    "ibm-granite-granite-3.3-2B-Instruct": ("<|end_of_text|>", "<|end_of_text|>"),
    "ibm-granite-granite-4.0": ("<|end_of_text|>", "<|end_of_text|>"),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": DEEPSEEK,
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": DEEPSEEK,
}

SYSTEM = {"role": "system", "content": "You are terse. Answer in one line."}
U1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "Paris."}
U2 = {"role": "user", "content": "  And of Japan? Answer with 日本語 too 🗾  "}
CONVERSATIONS = {
    "user": [U1],
    "system-user": [SYSTEM, U1],
    "multi-turn": [U1, A1, U2],
    "system-multi-turn": [SYSTEM, U1, A1, U2],
    "ends-with-assistant": [U1, A1],
    "roles-not-alternating": [U1, U2],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather <now> in a city, e.g. Zürich",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
THINKING = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
    {"role": "user", "content": "3+3?"},
]
VARIANTS = {  # (messages, extra template variables), rendered with the generation prompt
    "tools": ([U1], {"tools": TOOLS}),
    "thinking": (THINKING, {}),
    "thinking-off": (THINKING, {"enable_thinking": False}),
    "reasoning-effort": (THINKING, {"reasoning_effort": "high"}),
}


def templates() -> Path:
    return vendor.llama_cpp() / "models" / "templates"


@pytest.fixture(scope="module")
def backend():
    """The GPT-2 vocabulary as a `tokenizers` object, for both sides (the template text does
    not depend on it; it is loaded once rather than per family)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    backend = Backend(
        models.BPE.from_file(str(GPT2_DATA / "vocab.json"), str(GPT2_DATA / "merges.txt"))
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, backend):
    """(name, pocketlm tokenizer, transformers' PreTrainedTokenizerFast) with one family's
    real template and its bos/eos tokens. (Reading a template and its tokens from a folder
    or a GGUF is test_chat_template.py's subject.)"""
    from transformers import PreTrainedTokenizerFast

    template = (templates() / f"{request.param}.jinja").read_text()
    bos, eos = FAMILIES[request.param]
    named = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    oracle = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **named)
    assert oracle.encode("Hello world") == [15496, 995]
    assert oracle.special_tokens_map == named
    tok = Tokenizer(backend, eos_ids=frozenset(), chat_template=template, special_tokens=named)
    return request.param, tok, oracle


def _both(tok, oracle, messages, **kwargs) -> None:
    """pocketlm renders what transformers renders, or refuses with its message."""
    try:
        expected = oracle.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as error:  # the template's own refusal (TemplateError, TypeError...)
        message = " ".join(str(error).split())
        with pytest.raises(PocketLMError, match="chat template") as caught:
            tok.render_chat(messages, **kwargs)
        assert message in str(caught.value) and "\n" not in str(caught.value)
        return
    assert isinstance(expected, str) and expected  # an oracle that renders nothing proves nothing
    assert tok.render_chat(messages, **kwargs) == expected


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_family_templates_render_like_transformers(family, name, generation_prompt):
    _, tok, oracle = family
    _both(tok, oracle, CONVERSATIONS[name], add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_family_templates_with_tools_and_reasoning(family, variant):
    _, tok, oracle = family
    messages, extra = VARIANTS[variant]
    _both(tok, oracle, messages, add_generation_prompt=True, **extra)


# The end of each family's generation prompt, written by hand from its model card, so the
# comparison above is not between two identical wrong (or empty) renderings.
GENERATION_PROMPTS = {
    "Qwen-Qwen2.5-7B-Instruct": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "meta-llama-Llama-3.1-8B-Instruct": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "google-gemma-2-2b-it": "<bos><start_of_turn>user\nWhat is the capital of France?"
    "<end_of_turn>\n<start_of_turn>model\n",
    "microsoft-Phi-3.5-mini-instruct": "<|user|>\nWhat is the capital of France?<|end|>\n"
    "<|assistant|>\n",
    "openai-gpt-oss-120b": "<|start|>user<|message|>What is the capital of France?<|end|>"
    "<|start|>assistant",
    # llama.cpp's copy closes the think block unless enable_thinking is set
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": "<｜begin▁of▁sentence｜><｜User｜>What is the "
    "capital of France?<｜Assistant｜><think>\n</think>",
    "mistralai-Mistral-Nemo-Instruct-2407": "<s>[INST]What is the capital of France?[/INST]",
}


def test_family_generation_prompts_by_hand(family):
    name, tok, _ = family
    if name in GENERATION_PROMPTS:
        assert tok.render_chat([U1]).endswith(GENERATION_PROMPTS[name])


# -- a refusal, as the user sees it --


@pytest.fixture(scope="module")
def gemma_chat_model(tmp_path_factory):
    """A tiny GPT-2 carrying Gemma 2's real template, which refuses system messages and
    turns that do not alternate."""
    folder = make_gpt2(tmp_path_factory.mktemp("gemma-template"), n_positions=256)
    template = (templates() / "google-gemma-2-2b-it.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "bos_token": "<|endoftext|>"})
    )
    return folder


def test_cli_chat_shows_the_refusal_in_one_line(gemma_chat_model, tmp_path, monkeypatch, capsys):
    read, write = os.pipe()
    os.write(write, b"Hi\n")
    os.close(write)
    monkeypatch.setattr(sys, "stdin", os.fdopen(read))
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path))
    code = main(["chat", str(gemma_chat_model), "--system", "Be brief.", "-t", "0", "-n", "2"])
    err = capsys.readouterr().err
    assert code == 0  # the session goes on; the message was refused, not the program
    assert "error: the chat template refused this conversation: System role not supported\n" in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def gemma_server(gemma_chat_model):
    server = Server(pocketlm.load(str(gemma_chat_model)), max_batch=2, timeout=60)
    yield server
    server.close()


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([SYSTEM, U1], "System role not supported"),
        ([U1, U2], "Conversation roles must alternate user/assistant/user/assistant/..."),
    ],
)
def test_server_answers_a_refusal_with_400(gemma_server, messages, reason):
    client = gemma_server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    error = caught.value.body
    assert caught.value.status_code == 400
    assert error["message"] == f"the chat template refused this conversation: {reason}"
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"
    ok = client.chat.completions.create(model=MODEL, messages=[U1], max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"  # the server is fine after it


def test_a_template_that_fails_in_python_is_a_400_too(tmp_path):
    """Hermes 2 Pro's tool-use template iterates `tools`, which is None without tools:
    transformers raises TypeError; pocketlm says so in one line (HTTP 400, not 500)."""
    template = (templates() / "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja").read_text()
    folder = make_gpt2(tmp_path, n_positions=128)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    server = Server(pocketlm.load(str(folder)), max_batch=1, timeout=60)
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            server.client().chat.completions.create(model=MODEL, messages=[U1], max_tokens=2)
    finally:
        server.close()
    assert caught.value.body["message"] == (
        "the chat template failed on this conversation "
        "(TypeError: 'NoneType' object is not iterable)"
    )
