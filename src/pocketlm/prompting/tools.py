"""Tools in a conversation: which format a model calls them in, the prompt that offers them,
and the grammar that holds its calls to their parameter schemas.

- `tool_format(template)`: the format of the model's chat template (Hermes/Qwen
  `<tool_call>`, Llama 3.1 JSON, Mistral `[TOOL_CALLS]`), read from the template text.
  A template that does not render `tools` (SmolLM2's, GPT-2 without one) gets the
  default: a system-prompt section listing the functions as JSON and asking for
  `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (the Hermes wording, which many
  small models were trained on), parsed like Hermes.
- `chat_messages(messages, fmt, tools)`: OpenAI-style messages (assistant `tool_calls`
  with JSON-string arguments, `role: "tool"` results) made into what the template reads
  (arguments as objects, as transformers' templates expect), or, for the default format,
  into plain turns: calls written out in the default format, results as a user turn.
- `tool_grammar(...)`: a Lark grammar (llguidance's dialect, with `%json` for the schemas)
  for `tool_choice` required / a named function / auto, applied by
  `pocketlm.generate.constraint`.

Knows nothing of HTTP; the server's wire checks are `pocketlm.serve.tools`. The parser of
the model's output is `pocketlm.prompting.toolcalls`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pocketlm.errors import PocketLMError
from pocketlm.prompting.toolcalls import ToolFormat

HERMES = ToolFormat("hermes", ("<tool_call>",), end="</tool_call>")
LLAMA3 = ToolFormat("llama3", ("<|python_tag|>",), args_key="parameters", bare_json=True)
MISTRAL = ToolFormat("mistral", ("[TOOL_CALLS]",))
MISTRAL_ARGS = ToolFormat("mistral-args", ("[TOOL_CALLS]",), named_args=True)
DEFAULT = ToolFormat("default", ("<tool_call>",), end="</tool_call>", in_template=False)

DEFAULT_SECTION = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
# How pocketlm writes JSON in a call: as templates' `tojson` does, so the constrained
# output looks like the calls the model saw in its prompt.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def tool_format(template: str | None) -> ToolFormat:
    """The tool-call format of a chat template (DEFAULT when it renders no tools, or
    renders them in a format pocketlm does not know)."""
    if template is None or not re.search(r"\btools\b", template):
        return DEFAULT
    if "[TOOL_CALLS]" in template:
        return MISTRAL_ARGS if "[ARGS]" in template else MISTRAL
    # Hermes writes JSON in the tag; GLM, Qwen3-Coder and others write XML-like arguments.
    json_in_tag = re.search(r'<tool_call>[^<]{0,120}?\\?"name\\?"', template)
    if json_in_tag and "<arg_key>" not in template and "<function=" not in template:
        return HERMES
    if '"parameters"' in template and "<|start_header_id|>" in template:
        return LLAMA3
    return DEFAULT


# -- the prompt --


def chat_messages(
    messages: Sequence[Mapping[str, Any]], fmt: ToolFormat, tools: Sequence[Mapping] | None
) -> tuple[list[dict], dict[str, Any]]:
    """(messages, template variables) for rendering a conversation with tools in `fmt`.
    `tools` None renders no tool list (earlier calls and results still render)."""
    if fmt.in_template:
        out = [_template_message(m, fmt) for m in messages]
        return out, ({"tools": list(tools)} if tools else {})
    out = _default_messages(messages)
    if tools:
        section = DEFAULT_SECTION.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{section}"}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out, {}


def render(
    render_chat: Callable[..., str],
    messages: Sequence[Mapping[str, Any]],
    fmt: ToolFormat,
    tools: Sequence[Mapping] | None,
) -> str:
    """The prompt of a conversation with tools (`render_chat`: `Tokenizer.render_chat`).
    A template that refuses system messages (Gemma's) gets the default tool section at
    the top of the first user message instead."""
    chat, variables = chat_messages(messages, fmt, tools)
    try:
        return render_chat(chat, add_generation_prompt=True, **variables)
    except PocketLMError:
        users = [i for i, m in enumerate(chat) if i and m["role"] == "user"]
        ours = not fmt.in_template and tools and not any(m["role"] == "system" for m in messages)
        if not (ours and users):  # the refusal is not about our system turn
            raise
    section, chat = chat[0]["content"], chat[1:]
    first = users[0] - 1
    chat[first] = {**chat[first], "content": f"{section}\n\n{chat[first]['content']}"}
    return render_chat(chat, add_generation_prompt=True, **variables)


def _template_message(message: Mapping[str, Any], fmt: ToolFormat) -> dict:
    """A message as templates read it: call arguments as objects; Mistral's templates
    insist on 9-character ids, so ids are mapped to 9 characters there."""
    out = dict(message)
    short = _mistral_id if fmt in (MISTRAL, MISTRAL_ARGS) else (lambda i: i)
    if message.get("tool_calls"):
        out["content"] = message.get("content") or ""  # templates add it to strings
        calls = []
        for call in message["tool_calls"]:
            function = call["function"]
            arguments = _arguments(function["name"], function.get("arguments"))
            calls.append(
                {
                    **call,
                    "id": short(call.get("id") or ""),
                    "function": {**function, "arguments": arguments},
                }
            )
        out["tool_calls"] = calls
    if message.get("tool_call_id") is not None:
        out["tool_call_id"] = short(message["tool_call_id"])
    return out


def _mistral_id(call_id: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def _arguments(name: str, arguments: Any) -> Any:
    if not isinstance(arguments, str):
        return arguments or {}
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        raise PocketLMError(
            f"the arguments of the earlier call to {name!r} are not JSON: {arguments[:60]!r}"
        ) from None


def _default_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Calls written out as the model would have written them; each run of tool results
    one user turn of `<tool_response>` blocks (templates without tools know no tool role)."""
    names: dict[str, str] = {}
    out: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id") or "", "")
            block = json.dumps({"name": name, "content": m.get("content") or ""})
            block = f"<tool_response>\n{block}\n</tool_response>"
            if out and out[-1].get("_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_results": True})
            continue
        plain = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            blocks = []
            for call in m["tool_calls"]:
                function = call["function"]
                names[call.get("id") or ""] = function["name"]
                arguments = _arguments(function["name"], function.get("arguments"))
                blocks.append(call_text(DEFAULT, function["name"], arguments))
            plain["content"] = "\n".join(([plain["content"]] if plain["content"] else []) + blocks)
        out.append(plain)
    return [{k: v for k, v in m.items() if k != "_results"} for m in out]


def call_text(fmt: ToolFormat, name: str, arguments: Any) -> str:
    """One call as the default/Hermes format writes it."""
    body = json.dumps({"name": name, fmt.args_key: arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


# -- the grammar --


def tool_grammar(
    fmt: ToolFormat,
    tools: Sequence[Mapping[str, Any]],
    *,
    choice: str,
    parallel: bool,
    special: Callable[[str], int | None] = lambda text: None,
) -> str:
    """A Lark grammar (llguidance) for the reply: `choice` "required" (one call or more of
    any tool), "auto" (free text, or calls whose JSON is held to the schemas once begun)
    or a function's name (calls of that one). `parallel` False allows one call. `special`
    gives the id of a special token (Mistral's `[TOOL_CALLS]`), None if it is plain text."""
    allowed = [
        t for t in tools if choice in ("auto", "required") or t["function"]["name"] == choice
    ]
    schema = {"anyOf": [_call_schema(t, fmt) for t in allowed], "x-guidance": _JSON_STYLE}
    call_json = f"%json {json.dumps(schema)}"
    rules = ["%llguidance {}"]
    if fmt.named_args:
        tc, args = _literal("[TOOL_CALLS]", special), _literal("[ARGS]", special)
        alternatives = " | ".join(
            f"{json.dumps(t['function']['name'])} {args} %json {json.dumps(_params(t))}"
            for t in allowed
        )
        rules.append(f"call: {tc} ({alternatives})")
        calls = "call+" if parallel else "call"
    elif fmt.end is not None:  # Hermes and the default: tagged blocks
        trigger = _literal(fmt.triggers[0], special)
        rules.append(f'body: "\\n" {call_json} "\\n" {_literal(fmt.end, special)}')
        rules.append(f"call: {trigger} body")
        more = ' ("\\n" call)*' if parallel else ""
        calls = f"call{more}"
        if choice == "auto" and special(fmt.triggers[0]) is not None:
            calls = f"TEXT call{more}"  # a special token never occurs inside text
        elif choice == "auto":  # text, then maybe calls: the text ends where the tag starts
            rules.append(f"head[lazy]: ANY {trigger}")
            rules.append(r"ANY: /(.|\n)*/")
            calls = f"head body{more}"
    elif fmt.bare_json:  # Llama 3.1 takes one call a turn
        rules.append(f"call: {call_json}")
        calls = "call"
    else:  # Mistral's list
        tc = _literal("[TOOL_CALLS]", special)
        rules.append(f"item: {call_json}")
        rules.append(f'call: {tc} "[" item ' + ('(", " item)* "]"' if parallel else '"]"'))
        calls = "call"
    if choice != "auto":
        rules.insert(1, f"start: {calls}")
    else:
        rules.insert(1, f"start: TEXT | {calls}")
        rules.append(f"TEXT: {_free_text(fmt, special)}")
    return "\n".join(rules) + "\n"


def _call_schema(tool: Mapping[str, Any], fmt: ToolFormat) -> dict:
    name = tool["function"]["name"]
    return {
        "type": "object",
        "properties": {"name": {"const": name}, fmt.args_key: _params(tool)},
        "required": ["name", fmt.args_key],
        "additionalProperties": False,
    }


def _params(tool: Mapping[str, Any]) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def _literal(text: str, special: Callable[[str], int | None]) -> str:
    token = special(text)
    return json.dumps(text) if token is None else f"<[{token}]>"


def _free_text(fmt: ToolFormat, special: Callable[[str], int | None]) -> str:
    """Text that is not the start of a call (so a call, once begun, is held to the grammar)."""
    if fmt.bare_json:
        return r"/([^{](.|\n)*)?/"
    trigger = fmt.triggers[0]
    if special(trigger) is not None:
        return r"/(.|\n)*/"  # a special token never appears inside text
    return f"/(.|\\n)*/ & ~/(.|\\n)*{re.escape(trigger)}(.|\\n)*/"
