"""Chat templates: the sandboxed Jinja environment they are written for, and rendering.

A chat template is Jinja source shipped with a model (tokenizer_config.json, a .jinja file,
GGUF metadata). This module compiles it in the environment transformers renders it in (the
immutable sandbox, `raise_exception`, `strftime_now`, plain-JSON `tojson`, a `namespace`
that refuses underscore names, the `{% generation %}` tag) and renders a conversation with
it. It knows nothing of tokenizers, vocabularies or models: `Tokenizer.render_chat` is the
public entry point and hands over the template text and the named special tokens.

References: transformers `chat_template_utils.py` (`_compile_jinja_template`,
`render_jinja_template`), Jinja's sandbox documentation.
"""

from __future__ import annotations

import contextvars
import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pocketlm.errors import CorruptModelError, PocketLMError

_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")

# A template is code from the model file, run on every request: it may loop (nested
# range()s, recursive macros) or build values for far longer than any real template does.
RENDER_SECONDS = 5.0  # the time one rendering may take
_MAX_BUILT = 1 << 24  # items a `*` may build ("x" * 10**10 would take 10 GB)
_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("template_deadline")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with a time limit and a size limit. Every call a template
    makes (a macro, a filter, range() in a nested loop, a method) passes through `call`,
    which checks the clock; `*` and `**` pass through `call_binop`, which refuses a
    result too large to build (Jinja's sandbox documentation suggests the same hook)."""

    intercepted_binops = frozenset({"*", "**"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if time.monotonic() > _deadline.get(float("inf")):
            raise jinja2.exceptions.SecurityError(
                f"the template took longer than {RENDER_SECONDS:g} s to render"
            )
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and _number(left) and _number(right) and abs(right) > 1024:
            raise jinja2.exceptions.SecurityError(
                "the template raises a number to a power over 1024"
            )
        if operator == "*":
            size = _repeat_size(left, right)
            if size > _MAX_BUILT:
                raise jinja2.exceptions.SecurityError(
                    f"the template builds a value of {size:,} items (the limit is {_MAX_BUILT:,})"
                )
        return super().call_binop(context, operator, left, right)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _repeat_size(left: Any, right: Any) -> int:
    """How many items `left * right` builds when one side is a sequence (else 0)."""
    for seq, count in ((left, right), (right, left)):
        if isinstance(seq, str | list | tuple) and isinstance(count, int):
            return len(seq) * max(count, 0)
    return 0


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks in
    transformers); here it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates cannot set {name!r} on a namespace")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Not Jinja's own tojson: that one HTML-escapes, and templates expect plain JSON. Same
    # signature as transformers' (a positional argument is ensure_ascii, not indent).
    options = {"indent": indent, "separators": separators, "sort_keys": sort_keys}
    return json.dumps(value, ensure_ascii=ensure_ascii, **options)


def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled in the sandboxed environment transformers renders it in."""
    env = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except RecursionError:  # nesting deep enough to exhaust the parser
        raise CorruptModelError(
            "the model's chat template is nested too deeply to compile"
        ) from None
    except jinja2.TemplateSyntaxError as error:
        raise CorruptModelError(
            f"the model's chat template is not valid Jinja ({_one_line(error)})"
        ) from None


def _plain(value: Any) -> Any:
    """Plain JSON-like data only (what the template may touch); other objects become a
    placeholder naming their type, so the sandbox never sees their methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums...) carry methods: back to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())  # pydantic messages (e.g. from the openai client)
    return f"<{type(value).__name__}>"


def _chat_messages(messages: Sequence[Any]) -> list[dict]:
    """Messages as transformers hands them to templates: plain data, keys whose value is
    None dropped, and a reasoning text under both names templates read it by."""
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise PocketLMError(
                f"a chat message must be a dict with role and content, not {message!r}"
            )
        plain = {k: v for k, v in _plain(message).items() if v is not None}
        reasoning = next((plain[k] for k in _REASONING_KEYS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        chat.append(plain)
    return chat


def render(
    template: jinja2.Template,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool,
    variables: Mapping[str, Any],
) -> str:
    """`template` rendered for `messages`, as transformers' `apply_chat_template(...,
    tokenize=False)` renders it; `variables` (special tokens, tools...) become template
    variables, with `tools` and `documents` None unless given."""
    variables = {"tools": None, "documents": None, **variables}
    deadline = _deadline.set(time.monotonic() + RENDER_SECONDS)
    try:
        return template.render(
            messages=_chat_messages(messages),
            add_generation_prompt=add_generation_prompt,
            **_plain(variables),
        )
    except jinja2.TemplateError as error:  # raise_exception(...), undefined values, sandbox
        raise PocketLMError(
            f"the chat template refused this conversation: {_one_line(error)}"
        ) from None
    except (
        TypeError,
        ValueError,
        LookupError,
        ArithmeticError,  # OverflowError, ZeroDivisionError
        AttributeError,
        RecursionError,  # a macro that calls itself without end
        MemoryError,
    ) as error:
        # The template's own Python-level slip on this input (e.g. a tool-use template
        # iterating `tools` when none are given, as transformers fails too): still the
        # template's answer to this conversation, not a pocketlm bug.
        raise PocketLMError(
            f"the chat template failed on this conversation "
            f"({type(error).__name__}: {_one_line(error)})"
        ) from None
    finally:
        _deadline.reset(deadline)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
