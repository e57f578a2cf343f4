"""Tool calls in a model's output: a stream of text in, content and call deltas out.

A model that calls a tool writes the call as text in its own format (`ToolFormat`):
Hermes/Qwen wrap a JSON object (or, as SmolLM2 does, a list of them) in `<tool_call>` tags,
Llama 3.1 answers with a bare `{"name": ..., "parameters": ...}` or after `<|python_tag|>`,
Mistral writes `[TOOL_CALLS][{...}]` or `[TOOL_CALLS]name[ARGS]{...}`. `ToolCallParser`
reads that text as it streams and hands back two kinds of event: content text, and
`ToolCallDelta`s shaped like OpenAI's streamed `tool_calls` (the first one of a call carries
its index, id and name; the next ones carry fragments of its JSON arguments). Joining the
fragments gives the same calls whatever the text's split into pieces, and no part of a tag
is ever handed back as content: text that might be the start of a tag is held until the
next piece shows what it is.

Knows nothing of models, tokenizers or HTTP. (vLLM `tool_parsers/`, llama.cpp
`common/chat.cpp` parse the same formats.)
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

ARGUMENT_KEYS = ("arguments", "parameters")
_PRIMITIVE = re.compile(r"-?[0-9][0-9.eE+-]*|true|false|null")


@dataclass(frozen=True)
class ToolFormat:
    """How one family of models writes tool calls.

    `triggers` open a section of calls in running text; `end` closes one (None: the
    section ends where the calls do); `bare_json` lets a JSON object open the reply without
    a trigger (Llama 3.1); `named_args` is Mistral's newer `name[ARGS]{...}`; `args_key`
    is the key the arguments go under when pocketlm writes a call (the parser reads either);
    `in_template` says whether the model's chat template renders `tools` itself (if not,
    pocketlm's default system-prompt section does)."""

    name: str
    triggers: tuple[str, ...]
    end: str | None = None
    args_key: str = "arguments"
    bare_json: bool = False
    named_args: bool = False
    in_template: bool = True


@dataclass
class ToolCallDelta:
    """A piece of one tool call, as in OpenAI's `choices[].delta.tool_calls[]`."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def wire(self) -> dict:
        out: dict = {"index": self.index}
        if self.id is not None:
            out |= {"id": self.id, "type": "function"}
        function = {"arguments": self.arguments}
        if self.name is not None:
            function = {"name": self.name, **function}
        return out | {"function": function}


@dataclass
class ToolCall:
    """A whole tool call: OpenAI's `message.tool_calls[]`."""

    id: str
    name: str
    arguments: str

    def wire(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    """Feed text pieces in order (`feed`), then `finish`; each returns the events the new
    text completes: `str` content and `ToolCallDelta`s."""

    def __init__(self, fmt: ToolFormat, *, new_id: Callable[[], str] = call_id) -> None:
        self.fmt, self.new_id = fmt, new_id
        self.calls = 0  # calls started so far (the next call's index)
        self._buf = ""  # text received and not yet handed back
        self._state = "text"  # text | section | object | name | value
        self._said = False  # content other than white space handed back already
        self._held = ""  # white space held back (dropped if only calls follow)
        self._call: _OpenCall | None = None
        self._out: list[str | ToolCallDelta] = []

    def feed(self, text: str) -> list[str | ToolCallDelta]:
        self._buf += text
        while self._step(final=False):
            pass
        return self._take()

    def finish(self) -> list[str | ToolCallDelta]:
        """The end of the text: what was held back is content, or the last of a call cut short."""
        while self._step(final=True):
            pass
        if self._state in ("object", "value") and self._call is not None:
            self._call_text(self._buf, final=True)
        elif self._buf:
            self._content(self._buf)
        self._buf = ""
        if self._held and not self.calls:
            self._out.append(self._held)
        self._held = ""
        return self._take()

    # -- the states --

    def _step(self, *, final: bool) -> bool:
        """Advance over the buffer; False when it needs more text."""
        if not self._buf:
            return False
        if self._state == "text":
            return self._text(final=final)
        if self._state == "section":
            return self._section(final=final)
        if self._state == "name":
            return self._name()
        return self._call_text(self._buf, final=False)

    def _text(self, *, final: bool) -> bool:
        buf = self._buf
        if self.fmt.bare_json and not self._said and not self.calls:
            stripped = buf.lstrip()
            if not stripped and not final:
                return False  # only white space yet: the reply may still open with a call
            if stripped.startswith("{"):
                self._buf, self._state = stripped, "section"
                return True
        hits = [(buf.find(t), t) for t in self.fmt.triggers if t in buf]
        if hits:
            at, trigger = min(hits)
            self._content(buf[:at])
            self._buf = buf[at + len(trigger) :]
            self._state = "name" if self.fmt.named_args else "section"
            return True
        keep = 0 if final else _partial_suffix(buf, self.fmt.triggers)
        self._content(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]
        return False

    def _section(self, *, final: bool) -> bool:
        """Between calls of one section: separators, a call's `{`, or the end tag."""
        buf = self._buf.lstrip(" \t\r\n,;[]")
        if not buf:  # separators alone (a list's brackets and commas) are not content
            self._buf = ""
            return False
        if buf.startswith("{"):
            self._buf, self._state, self._call = buf, "object", _OpenCall()
            return True
        end = self.fmt.end
        if end and buf.startswith(end):
            self._buf, self._state = buf[len(end) :], "text"
            return True
        if end and buf and end.startswith(buf) and not final:
            return False  # maybe the end tag, cut short
        self._state = "text"  # not a call after all: back to running text
        return True

    def _name(self) -> bool:
        """Mistral's `name[ARGS]{...}` (maybe `name[CALL_ID]id[ARGS]{...}`)."""
        at = self._buf.find("[ARGS]")
        if at < 0:
            return False
        name = self._buf[:at].split("[CALL_ID]")[0].strip()
        self._buf = self._buf[at + len("[ARGS]") :].lstrip()
        self._call = _OpenCall(name=name, value_only=True)
        self._state = "value"
        return True

    def _call_text(self, text: str, *, final: bool) -> bool:
        """The open call's text so far: emit what it completes; True when the call ended."""
        call = self._call
        scan = _scan_value(text, 0) if call.value_only else _scan_call(text)
        if call.value_only:
            call.args_start, call.args_end, call.end = 0, scan, scan
        else:
            call.name = call.name or scan.name
            call.args_start, call.args_end, call.end = scan.args_start, scan.args_end, scan.end
            if scan.bad:  # not JSON after all: the call ends at the end tag, if any
                at = text.find(self.fmt.end) if self.fmt.end else -1
                if at < 0 and self.fmt.end and not final:
                    return False  # wait for it
                call.end = at if at >= 0 else len(text)
        self._emit(call, text)
        done = call.end is not None and call.end >= 0
        if not done and not final:
            return False
        self._finish_call(call, text, end=call.end if done else len(text))
        return True

    # -- output --

    def _emit(self, call: _OpenCall, text: str) -> None:
        if call.name is None:
            return  # the name comes first on the wire: wait for it
        if call.index is None:
            call.index, self.calls = self.calls, self.calls + 1
            self._out.append(ToolCallDelta(call.index, id=self.new_id(), name=call.name))
        if call.args_start is None:
            return
        stop = call.args_end if call.args_end is not None and call.args_end >= 0 else len(text)
        args = text[call.args_start : stop]
        if len(args) > call.sent:
            self._out.append(ToolCallDelta(call.index, arguments=args[call.sent :]))
            call.sent = len(args)

    def _finish_call(self, call: _OpenCall, text: str, *, end: int) -> None:
        if call.name is None:  # a JSON object that is not a call: it was content
            self._content(text[:end])
        elif call.sent == 0:
            self._out.append(ToolCallDelta(call.index, arguments="{}"))
        self._buf, self._call = text[end:], None
        self._state = "text" if call.value_only or call.name is None else "section"

    def _content(self, text: str) -> None:
        # White space at either end is held until something follows it: dropped between
        # calls and the reply's edges, kept inside content (the same for any split).
        text = self._held + text
        if self.calls and not self._said:
            text = text.lstrip()
        core = text.rstrip()
        self._held = text[len(core) :]
        if core:
            self._out.append(core)
            self._said = True

    def _take(self) -> list[str | ToolCallDelta]:
        out, self._out = _merged(self._out), []
        return out


@dataclass
class _OpenCall:
    name: str | None = None
    value_only: bool = False  # the text is the arguments value alone (Mistral [ARGS])
    index: int | None = None
    args_start: int | None = None
    args_end: int | None = None
    end: int | None = None
    sent: int = 0  # argument characters handed back


@dataclass
class _CallScan:
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    end: int | None = None  # index after the closing brace; None: not there yet
    bad: bool = False  # not a call object (e.g. malformed JSON)


def _scan_call(text: str) -> _CallScan:
    """What of a `{"name": ..., "arguments": ...}` object `text` holds so far."""
    out, i = _CallScan(), 1  # text[0] is "{"
    while True:
        i = _skip_space(text, i)
        if i >= len(text):
            return out
        if text[i] == "}":
            out.end = i + 1
            return out
        key_end = _scan_value(text, i)
        if key_end is None:
            return out
        if key_end < 0 or text[i] != '"':
            out.bad = True
            return out
        key = json.loads(text[i:key_end])
        i = _skip_space(text, key_end)
        if i >= len(text):
            return out
        if text[i] != ":":
            out.bad = True
            return out
        i = _skip_space(text, i + 1)
        if i >= len(text):
            return out
        value_end = _scan_value(text, i)
        if key in ARGUMENT_KEYS:
            out.args_start, out.args_end = i, value_end
        if value_end is None:
            return out
        if value_end < 0:
            out.bad = True
            return out
        if key == "name" and text[i] == '"':
            out.name = json.loads(text[i:value_end])
        i = _skip_space(text, value_end)
        if i < len(text) and text[i] == ",":
            i += 1


def _scan_value(text: str, i: int) -> int | None:
    """The index after the JSON value starting at `text[i]`; None if it is not complete
    yet, -1 if it is not JSON."""
    if i >= len(text):
        return None
    if text[i] not in '{["':
        match = _PRIMITIVE.match(text, i)
        if not match:
            return -1
        return match.end() if match.end() < len(text) else None  # a number may go on
    depth, in_string, escaped = 0, False, False
    for j in range(i, len(text)):
        c = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 0:
                    return j + 1
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _partial_suffix(text: str, tags: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that a tag starts with (to hold back)."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if tag.startswith(text[-n:]):
                best = n
                break
    return best


def _merged(events: list[str | ToolCallDelta]) -> list[str | ToolCallDelta]:
    """Adjacent content joined, adjacent argument fragments of one call joined."""
    out: list[str | ToolCallDelta] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, str) and isinstance(last, str):
            out[-1] = last + event
        elif (
            isinstance(event, ToolCallDelta)
            and isinstance(last, ToolCallDelta)
            and event.index == last.index
            and event.id is None
        ):
            last.arguments += event.arguments
        else:
            out.append(event)
    return out


def assemble(events: list[str | ToolCallDelta]) -> tuple[str, list[ToolCall]]:
    """(content, calls) from a whole list of events: what a non-streamed reply carries."""
    content, calls = [], {}
    for event in events:
        if isinstance(event, str):
            content.append(event)
        elif event.index not in calls:
            calls[event.index] = ToolCall(event.id or call_id(), event.name or "", event.arguments)
        else:
            calls[event.index].arguments += event.arguments
    return "".join(content), [calls[i] for i in sorted(calls)]


def parse(text: str, fmt: ToolFormat) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole reply."""
    parser = ToolCallParser(fmt)
    return assemble(parser.feed(text) + parser.finish())
