"""Tool calling on the OpenAI wire: a request's `tools`, `tool_choice` and
`parallel_tool_calls` checked and turned into a prompt and a grammar; the model's output
turned back into `message.tool_calls` or streamed `delta.tool_calls`.

    auto      the tools are in the prompt; the model writes text or calls, and a call, once
              begun, is held to the tool's parameter schema by the grammar
    required  the reply is one call or more (one when parallel_tool_calls is false)
    {"type": "function", "function": {"name": ...}}   calls of that function only
    none      the tools are left out of the prompt; nothing is constrained or parsed

The formats, the prompt and the grammar are `pocketlm.prompting.tools`; the parser
`pocketlm.prompting.toolcalls`. Pure functions of the request and a tokenizer; no I/O.
Anthropic's Messages API maps its own tool fields onto `offered` (serve/anthropic.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pocketlm.errors import PocketLMError
from pocketlm.generate.constraint import Grammar
from pocketlm.prompting.toolcalls import ToolCallParser, ToolFormat, assemble
from pocketlm.prompting.tools import tool_format, tool_grammar
from pocketlm.serve.schemas import ApiError, ChatCompletionRequest, ChatMessage
from pocketlm.tokenizer import Tokenizer


@dataclass
class Tooling:
    """A request's tools as the engine uses them."""

    fmt: ToolFormat
    tools: list[dict]  # the wire definitions, as templates read them
    choice: str  # "auto", "required" or a function's name
    parallel: bool
    grammar: Grammar


def tooling(body: ChatCompletionRequest, tokenizer: Tokenizer) -> Tooling | None:
    """The request's tools, checked (a 400 names what is wrong); None without tools or
    with tool_choice "none"."""
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice != "none":
            raise ApiError("tool_choice needs tools to choose from", param="tool_choice")
        return None
    if choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    for number, tool in enumerate(tools):
        parameters = tool["function"].get("parameters")
        if parameters is not None and parameters.get("type", "object") != "object":
            raise ApiError(
                f"tools[{number}].function.parameters must be a JSON schema of type object",
                param=f"tools.{number}.function.parameters",
            )
    name = choice if isinstance(choice, str) or choice is None else choice.function.name
    return offered(
        tools, choice=name or "auto", parallel=body.parallel_tool_calls, tokenizer=tokenizer
    )


def offered(tools: list[dict], *, choice: str, parallel: bool, tokenizer: Tokenizer) -> Tooling:
    """Tools as OpenAI's wire defines them (`{"type": "function", "function": {name,
    description, parameters}}`), whichever API they came in, with `choice` "auto",
    "required" or a function's name: their format for this model and the grammar of the
    reply. Two tools of one name, a choice not among them, or schemas the constraint
    cannot enforce are 400s."""
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) < len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ApiError(f"two tools are named {duplicate!r}", param="tools")
    if choice not in ("auto", "required", *names):
        raise ApiError(
            f"tool_choice names the function {choice!r}, which is not among the tools",
            param="tool_choice",
        )
    fmt = tool_format(tokenizer.chat_template)
    text = tool_grammar(fmt, tools, choice=choice, parallel=parallel, special=_special(tokenizer))
    try:
        grammar = Grammar.lark(text)
    except PocketLMError as error:
        raise ApiError(f"the tools' parameter schemas: {error}", param="tools") from None
    return Tooling(fmt, tools, choice, parallel, grammar)


def _special(tokenizer: Tokenizer) -> Callable[[str], int | None]:
    """The id of a tag that is one special token of the vocabulary, else None."""

    def special(text: str) -> int | None:
        token = tokenizer.token_to_id(text)
        return token if token is not None and token in tokenizer.special_ids else None

    return special


def plain_messages(messages: list[ChatMessage]) -> list[dict]:
    """Wire messages as plain dicts, tool calls and results included."""
    out = []
    for m in messages:
        plain = {"role": m.role, "content": m.text}
        if m.tool_calls:
            plain["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            plain["tool_call_id"] = m.tool_call_id
        if m.name is not None and m.role == "tool":
            plain["name"] = m.name
        out.append(plain)
    return out


def message(text: str, finish_reason: str | None, tools: Tooling) -> tuple[dict, str | None]:
    """(assistant message, finish reason) of a whole reply: its calls under `tool_calls`,
    content null when there are only calls, finish reason "tool_calls" when it called."""
    parser = ToolCallParser(tools.fmt)
    content, calls = assemble(parser.feed(text) + parser.finish())
    out = {"role": "assistant", "content": content or None, "refusal": None}
    if not calls:
        return {**out, "content": content}, finish_reason
    out["tool_calls"] = [c.wire() for c in calls]
    return out, "tool_calls" if finish_reason == "stop" else finish_reason


class DeltaStream:
    """One streamed choice's text as chat deltas: content and `tool_calls` pieces."""

    def __init__(self, tools: Tooling) -> None:
        self.parser = ToolCallParser(tools.fmt)

    def deltas(self, text: str, finish_reason: str | None) -> list[dict]:
        """Keyword arguments for `convert.chat_delta`, one dict per chunk to send."""
        events = self.parser.feed(text)
        if finish_reason is not None:
            events += self.parser.finish()
        out = [{"content": e} if isinstance(e, str) else {"tool_calls": [e.wire()]} for e in events]
        if finish_reason is not None:
            if finish_reason == "stop" and self.parser.calls:
                finish_reason = "tool_calls"
            out.append({"finish_reason": finish_reason})
        return out
