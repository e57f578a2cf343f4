"""Few-shot prompting: show the model a few solved examples, then ask it the next one.

A base model only continues text, so the way to ask it a question is to write the start of a
pattern it will complete (Brown et al. 2020, "Language Models are Few-Shot Learners"):

    Q: What is the capital of Italy?
    A: Rome

    Q: What is the capital of Peru?
    A:

Examples come from JSONL (one `{"input": ..., "output": ...}` object a line; `question` /
`answer` and `prompt` / `completion` are accepted too) or YAML (a list of such mappings, or
a mapping with `examples:` and optionally `template:` and `separator:`). A template holds
`{input}` and `{output}`; the prompt ends right where `{output}` begins, and generation stops
at the start of the next example, so the answer comes back alone.

Knows nothing of models beyond the engine's `stream` (pocketlm.generate.engine); nothing here touches the terminal.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pocketlm.errors import PocketLMError
from pocketlm.generate.stream import lstrip_text

if TYPE_CHECKING:
    from pocketlm.generate.engine import Engine, Session
    from pocketlm.generate.request import Chunk

DEFAULT_TEMPLATE = "Q: {input}\nA: {output}"
DEFAULT_SEPARATOR = "\n\n"
# Accepted spellings of an example's two fields, in the order they are tried.
FIELD_PAIRS = (("input", "output"), ("question", "answer"), ("prompt", "completion"))


@dataclass(frozen=True)
class Example:
    input: str
    output: str


@dataclass(frozen=True)
class FewShot:
    """Solved examples and the template that writes each one; `prompt(query)` asks the next."""

    examples: tuple[Example, ...]
    template: str = DEFAULT_TEMPLATE
    separator: str = DEFAULT_SEPARATOR

    def __post_init__(self) -> None:
        check_template(self.template)
        if not self.separator:
            raise PocketLMError("the separator between examples must not be empty")

    @classmethod
    def from_file(
        cls, path: str | Path, *, template: str | None = None, separator: str | None = None
    ) -> FewShot:
        """Examples (and the file's own template/separator, unless overridden) from a file."""
        loaded = load_examples(path)
        return cls(
            examples=tuple(loaded.examples),
            template=template or loaded.template or DEFAULT_TEMPLATE,
            separator=separator or loaded.separator or DEFAULT_SEPARATOR,
        )

    @classmethod
    def build(
        cls,
        examples: str | Path | Iterable[Example | Mapping[str, Any] | tuple[str, str]],
        *,
        template: str | None = None,
        separator: str | None = None,
    ) -> FewShot:
        """From a file path or from Python values (Example, (input, output), mappings)."""
        if isinstance(examples, (str, Path)):
            return cls.from_file(examples, template=template, separator=separator)
        shots = as_examples(examples)
        if not shots:
            raise PocketLMError("few-shot prompting needs at least one example")
        return cls(
            examples=tuple(shots),
            template=template or DEFAULT_TEMPLATE,
            separator=separator or DEFAULT_SEPARATOR,
        )

    def prompt(self, query: str) -> str:
        """The examples, then the query written up to where its answer would start."""
        head, _ = self.template.split("{output}", 1)
        # No trailing space: BPE vocabularies put the space at the start of the next word
        # (" Lima"), so a prompt ending in "A: " pushes the model off its usual tokens.
        ask = _fill(head, query).rstrip(" \t")
        shots = [_fill(self.template, e.input, output=e.output) for e in self.examples]
        return self.separator.join([*shots, ask])

    @property
    def stops(self) -> list[str]:
        """Where the next example starts: the separator, and a new line that opens with the
        template's first words ("\\nQ:")."""
        stops = [self.separator]
        lead = self.template.split("{input}", 1)[0].strip()
        if lead:
            stops.append("\n" + lead)
        return stops

    def stream(
        self, lm: Engine | Session, query: str, *, max_tokens: int = 64, **options: Any
    ) -> Iterator[Chunk]:
        """Stream the answer to `query` (from an engine, or a session that keeps its cache),
        without the leading space and the next example. Options are checked now."""
        if not query.strip():
            raise PocketLMError("the question is empty: give some text to answer")
        stop = options.pop("stop", ())
        stop = [stop] if isinstance(stop, str) else list(stop)
        chunks = lm.stream(
            self.prompt(query), max_tokens=max_tokens, stop=[*self.stops, *stop], **options
        )
        return lstrip_text(chunks)

    def answer(self, lm: Engine | Session, query: str, **options: Any) -> str:
        """The answer to `query`, stripped."""
        return "".join(chunk.text for chunk in self.stream(lm, query, **options)).strip()


@dataclass
class LoadedExamples:
    examples: list[Example]
    template: str | None = None
    separator: str | None = None


def check_template(template: str) -> None:
    """A template needs `{input}` then `{output}`, once each."""
    if template.count("{input}") != 1 or template.count("{output}") != 1:
        raise PocketLMError(
            f"a few-shot template needs {{input}} and {{output}} once each (got {template!r}); "
            "e.g. 'Q: {input}\\nA: {output}'"
        )
    if template.index("{input}") > template.index("{output}"):
        raise PocketLMError(
            f"in a few-shot template {{input}} must come before {{output}} (got {template!r})"
        )


def _fill(text: str, value: str, *, output: str = "") -> str:
    # Plain replacement rather than str.format: examples and templates may hold braces.
    return text.replace("{input}", value).replace("{output}", output)


def as_examples(items: Iterable[Example | Mapping[str, Any] | tuple[str, str]]) -> list[Example]:
    """Examples from Python values: Example, (input, output) pairs or mappings."""
    out = []
    for item in items:
        if isinstance(item, Example):
            out.append(item)
        elif isinstance(item, tuple) and len(item) == 2:
            out.append(Example(str(item[0]), str(item[1])))
        else:
            out.append(_example(item, where="an example"))
    return out


def load_examples(path: str | Path) -> LoadedExamples:
    """Read a `.jsonl` / `.json` / `.yaml` / `.yml` examples file; errors name file and line."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PocketLMError(f"{path}: no such examples file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PocketLMError(f"{path}: cannot read it ({error})") from None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        loaded = _from_jsonl(text, path)
    elif suffix in (".yaml", ".yml"):
        loaded = _from_yaml(text, path)
    else:
        raise PocketLMError(
            f"{path}: examples must be .jsonl or .yaml (got {suffix or 'no suffix'})"
        )
    if not loaded.examples:
        raise PocketLMError(f"{path}: holds no examples")
    if loaded.template is not None:
        try:
            check_template(loaded.template)
        except PocketLMError as error:
            raise PocketLMError(f"{path}: {error}") from None
    return loaded


def _from_jsonl(text: str, path: Path) -> LoadedExamples:
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise PocketLMError(
                f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno})"
            ) from None
        examples.append(_example(item, where=f"{path}:{number}"))
    return LoadedExamples(examples)


def _from_yaml(text: str, path: Path) -> LoadedExamples:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise PocketLMError(f"{path}{line}: not valid YAML ({problem})") from None
    finally:
        loader.dispose()
    template = separator = None
    items_node = node
    if isinstance(data, dict):
        template, separator = data.get("template"), data.get("separator")
        for name, value in (("template", template), ("separator", separator)):
            if value is not None and not isinstance(value, str):
                raise PocketLMError(f"{path}: {name} must be text (got {type(value).__name__})")
        items_node = next((v for k, v in node.value if k.value == "examples"), None)
        data = data.get("examples")
    if not isinstance(data, list):
        raise PocketLMError(
            f"{path}: expected a list of examples (or a mapping with an 'examples:' list)"
        )
    lines = [item.start_mark.line + 1 for item in items_node.value]
    examples = [
        _example(item, where=f"{path}:{line}") for item, line in zip(data, lines, strict=True)
    ]
    return LoadedExamples(examples, template, separator)


def _example(item: Any, *, where: str) -> Example:
    if not isinstance(item, Mapping):
        raise PocketLMError(
            f'{where}: an example must be a mapping like {{"input": ..., "output": ...}}'
        )
    for first, second in FIELD_PAIRS:
        if first in item or second in item:
            missing = [name for name in (first, second) if name not in item]
            if missing:
                raise PocketLMError(
                    f"{where}: the example has {first if second in missing else second!r} but no {missing[0]!r}"
                )
            values = item[first], item[second]
            if not all(
                isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values
            ):
                raise PocketLMError(f"{where}: {first!r} and {second!r} must be text")
            return Example(str(values[0]), str(values[1]))
    keys = ", ".join(map(str, item)) or "none"
    raise PocketLMError(
        f"{where}: an example needs 'input' and 'output' (or 'question' and 'answer'); it has: {keys}"
    )
