"""Conversations: turns rendered into one prompt, a reply streamed per turn, the KV cache kept.

Two ways to write a conversation as a prompt:
  - models with a chat template (instruct models such as SmolLM2): the template renders
    the system prompt and turns (`Tokenizer.render_chat`); the model ends its reply with an
    end-of-turn token;
  - base models (GPT-2): a transcript harness, a short few-shot dialogue then `User:` /
    `Assistant:` lines; generation stops when the model starts the next "\\nUser:" line.
    (The trick of the original GPT-2/GPT-3 chat demos; llama.cpp's `chat.sh` does the same.)

Cache reuse. A conversation holds its own session (pocketlm.generate.engine), which computes
only what follows the longest common prefix of the cached ids and the new prompt's ids.
That only pays off if turn N+1's ids really start with the ids of turn N's prompt + reply, which
re-tokenizing the text does not guarantee: the model may have generated a non-canonical
split, and a stop string may end inside a token. So the conversation keeps a log: the
text of the last prompt + reply and the exact ids the model saw and produced for it. When
the next rendered prompt starts with that text (templates and harness append only), its
ids are the logged ids + the new tail encoded alone, accepted when the tail's tokens spell
exactly its bytes; otherwise (a template that rewrites history, dropped turns) the whole
prompt is re-encoded and common-prefix reuse does what it can.

When prompt + max_tokens outgrows the context window the oldest turns are dropped (the
system prompt and the harness preamble stay) and a warning is logged once.

Knows nothing of terminals; the interactive prompt is `pocketlm.cli.interactive`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pocketlm.errors import PocketLMError
from pocketlm.generate.stream import lstrip_text

if TYPE_CHECKING:
    from pocketlm.generate.engine import Engine, Session
    from pocketlm.generate.params import GenerationParams
    from pocketlm.generate.request import Chunk
    from pocketlm.tokenizer import Tokenizer

log = logging.getLogger("pocketlm")

DEFAULT_INTRO = (
    "A conversation between a curious User and a helpful, friendly Assistant. "
    "The Assistant answers truthfully, clearly and briefly."
)
DEFAULT_EXAMPLES = (
    ("Hello! Who are you?", "Hi! I am an AI assistant. How can I help you today?"),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
)


@dataclass
class Turn:
    """One exchange. `assistant` is the reply exactly as generated (a transcript reply
    keeps its leading space: it is part of the prompt the next turn extends)."""

    user: str
    assistant: str

    @property
    def reply(self) -> str:
        return self.assistant.strip()


@dataclass(frozen=True)
class Harness:
    """The transcript that makes a base model act as an assistant: an intro line (the
    system prompt replaces it), a few example exchanges, and the speakers' names."""

    intro: str = DEFAULT_INTRO
    user: str = "User"
    assistant: str = "Assistant"
    examples: tuple[tuple[str, str], ...] = DEFAULT_EXAMPLES

    def __post_init__(self) -> None:
        for name in (self.user, self.assistant):
            if not name.strip() or "\n" in name or ":" in name:
                raise PocketLMError(f"a speaker name must be one line without ':' (got {name!r})")

    @classmethod
    def from_file(cls, path: str | Path) -> Harness:
        """A YAML/JSON mapping (`intro`, `user`, `assistant`, `examples: [{user, assistant}]`)
        or a .txt file holding the intro."""
        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise PocketLMError(f"{path}: cannot read the harness ({error})") from None
        if path.suffix.lower() == ".txt":
            return cls(intro=text.strip())
        try:
            data = yaml.safe_load(text)  # JSON is YAML too
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise PocketLMError(
                f"{where}: not valid YAML/JSON ({getattr(error, 'problem', error)})"
            ) from None
        return cls._from_mapping(data, path)

    @classmethod
    def _from_mapping(cls, data: Any, path: Path) -> Harness:
        if not isinstance(data, Mapping):
            raise PocketLMError(
                f"{path}: a harness is a mapping with intro, user, assistant, examples"
            )
        if unknown := sorted(set(data) - {"intro", "user", "assistant", "examples"}):
            raise PocketLMError(
                f"{path}: unknown harness key {unknown[0]!r}; keys are intro, user, assistant, examples"
            )
        fields: dict[str, Any] = {}
        for key in ("intro", "user", "assistant"):
            if key in data:
                if not isinstance(data[key], str):
                    raise PocketLMError(f"{path}: {key} must be text")
                fields[key] = data[key].strip()
        examples = []
        for number, item in enumerate(data.get("examples") or [], start=1):
            if not (
                isinstance(item, Mapping)
                and isinstance(item.get("user"), str)
                and isinstance(item.get("assistant"), str)
            ):
                raise PocketLMError(f"{path}: example {number} needs 'user' and 'assistant' text")
            examples.append((item["user"], item["assistant"]))
        if "examples" in data:
            fields["examples"] = tuple(examples)
        return cls(**fields)

    @property
    def stops(self) -> list[str]:
        return [f"\n{self.user}:"]

    def render(self, *, system: str | None, turns: Seq[Turn], message: str) -> str:
        """The transcript up to "Assistant:", where the model writes its reply."""
        lines = [(system or self.intro).strip(), ""] if (system or self.intro).strip() else []
        for user, assistant in self.examples:
            lines += [f"{self.user}: {user}", f"{self.assistant}: {assistant}"]
        for turn in turns:
            # The reply is written as generated, leading space included, so the text of the
            # previous prompt + reply is a prefix of this one.
            lines += [f"{self.user}: {turn.user}", f"{self.assistant}:{turn.assistant}"]
        lines += [f"{self.user}: {message}", f"{self.assistant}:"]
        return "\n".join(lines)


@dataclass
class _Log:
    """The last prompt + reply as text and as the exact ids the model saw and produced."""

    text: str
    ids: list[int]


@dataclass
class Conversation:
    """A chat with one model (an `LM`, or any `generate.Engine`): system prompt, turns, the
    rendering that makes them a prompt, and the session whose KV cache they reuse.

    `harness=None` uses the model's chat template when it has one, else the default
    transcript harness."""

    lm: Engine
    system: str | None = None
    harness: Harness | None = None
    turns: list[Turn] = field(default_factory=list)
    first_kept: int = 0  # turns before this one no longer fit the context window
    reuse_ids: bool = True  # False: re-encode the whole text every turn (to compare)
    retokenized: int = 0  # prompts encoded whole because they did not extend the log
    _log: _Log | None = field(default=None, repr=False)
    # The KV cache the turns reuse (default: a new session of `lm`); pass one on to keep
    # a cache that already holds this conversation's text.
    session: Session | None = field(default=None, repr=False)
    _warned: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.harness is None and self.lm.tokenizer.chat_template is None:
            self.harness = Harness()
        if self.session is None:
            self.session = self.lm.session()

    @property
    def uses_template(self) -> bool:
        return self.harness is None

    @property
    def stops(self) -> list[str]:
        return [] if self.harness is None else self.harness.stops

    @property
    def dropped_turns(self) -> int:
        return self.first_kept

    def render(self, message: str, *, turns: Seq[Turn] | None = None) -> str:
        """The prompt text for `message` after `turns` (default: the kept turns)."""
        turns = self.turns[self.first_kept :] if turns is None else turns
        if self.harness is not None:
            return self.harness.render(system=self.system, turns=turns, message=message)
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for turn in turns:
            messages += [
                {"role": "user", "content": turn.user},
                {"role": "assistant", "content": turn.assistant},
            ]
        messages.append({"role": "user", "content": message})
        return self.lm.tokenizer.render_chat(messages, add_generation_prompt=True)

    def prompt_ids(self, message: str, *, max_tokens: int) -> tuple[str, list[int]]:
        """(text, ids) of the prompt for `message`, dropping the oldest turns until it and
        `max_tokens` new tokens fit the context window."""
        room = self.lm.context_length - max_tokens
        dropped_before = self.first_kept
        while True:
            text = self.render(message)
            ids = self._encode(text)
            if len(ids) <= room or self.first_kept == len(self.turns):
                break
            self.first_kept += 1
        if len(ids) > room:
            self.first_kept = dropped_before
            raise PocketLMError(
                f"this message makes a {len(ids)}-token prompt; with {max_tokens} new tokens it "
                f"does not fit the {self.lm.context_length}-token context: shorten it or lower max_tokens"
            )
        if self.first_kept > dropped_before and not self._warned:
            self._warned = True
            log.warning(
                "the conversation outgrew the %d-token context window: dropping the oldest turns "
                "(the system prompt and preamble stay); this happens again as it grows",
                self.lm.context_length,
            )
        return text, ids

    def send(
        self, message: str, *, max_tokens: int = 256, stop: Seq[str] = (), **options: Any
    ) -> Iterator[Chunk]:
        """Stream the reply to `message` (options checked now, as `Engine.stream`'s); the
        turn is recorded when the stream ends, also when it is cut short (Ctrl-C, or the
        caller closing the iterator). The last chunk carries the statistics."""
        if not message.strip():
            raise PocketLMError("the message is empty: type something to say")
        stop = [stop] if isinstance(stop, str) else list(stop)
        params = self.lm.params(
            max_tokens=max_tokens, stop=[*self.stops, *stop], truncate=False, **options
        )
        text, ids = self.prompt_ids(message, max_tokens=max_tokens)
        return self._reply(message, text=text, ids=ids, params=params)

    def _reply(
        self, message: str, *, text: str, ids: list[int], params: GenerationParams
    ) -> Iterator[Chunk]:
        pieces: list[str] = []
        reply_ids: list[int] = []

        def recorded() -> Iterator[Chunk]:
            for chunk in self.session.run(ids, params):
                pieces.append(chunk.text)
                if chunk.token is not None:
                    reply_ids.append(chunk.token)
                yield chunk

        try:
            yield from lstrip_text(recorded())  # shown without the space after "Assistant:"
        finally:
            # The text as generated, leading space included: the next prompt extends it.
            reply = "".join(pieces)
            self._record(message, text=text, ids=ids, reply=reply, reply_ids=reply_ids)

    def _record(
        self, message: str, *, text: str, ids: list[int], reply: str, reply_ids: list[int]
    ) -> None:
        if not reply_ids and not reply:
            return  # stopped before anything came out: forget the message
        self.turns.append(Turn(message, reply))
        kept = _ids_spelling_prefix(self.lm.tokenizer, reply_ids, text=reply)
        spelled = b"".join(self.lm.tokenizer.token_bytes(i) for i in kept).decode("utf-8")
        self._log = _Log(text + spelled, ids + kept)

    def _encode(self, text: str) -> list[int]:
        tokenizer = self.lm.tokenizer
        if self.reuse_ids and self._log is not None and text.startswith(self._log.text):
            tail = text[len(self._log.text) :]
            tail_ids = tokenizer.encode(tail, add_bos=False)
            # A SentencePiece vocabulary may add a word-start space to a lone piece: then the
            # ids would not spell the text, and the whole prompt is encoded instead.
            if b"".join(tokenizer.token_bytes(i) for i in tail_ids) == tail.encode("utf-8"):
                return self._log.ids + tail_ids
        if self._log is not None:
            self.retokenized += 1
        return tokenizer.encode(text, add_bos=False if self.harness is None else None)

    def clear(self) -> None:
        """Forget the turns (the system prompt and harness stay)."""
        self.turns, self.first_kept, self._log, self._warned = [], 0, None, False

    def to_dict(self) -> dict[str, Any]:
        """The conversation as plain data (for saving a session)."""
        return {
            "system": self.system,
            "harness": None
            if self.harness is None
            else {
                "intro": self.harness.intro,
                "user": self.harness.user,
                "assistant": self.harness.assistant,
                "examples": [{"user": u, "assistant": a} for u, a in self.harness.examples],
            },
            "turns": [{"user": t.user, "assistant": t.assistant} for t in self.turns],
            "first_kept": self.first_kept,
        }

    @classmethod
    def from_dict(
        cls,
        lm: Engine,
        data: Mapping[str, Any],
        *,
        source: str = "session",
        session: Session | None = None,
    ) -> Conversation:
        """Inverse of `to_dict` (`session`: a KV cache to keep using); bad data is a
        one-line PocketLMError naming `source`."""
        try:
            harness = data.get("harness")
            conv = cls(
                lm,
                system=data.get("system"),
                harness=None if harness is None else Harness._from_mapping(harness, Path(source)),
                turns=[Turn(str(t["user"]), str(t["assistant"])) for t in data.get("turns", [])],
                session=session,
            )
            conv.first_kept = min(int(data.get("first_kept", 0)), len(conv.turns))
        except (TypeError, KeyError, ValueError, AttributeError) as error:
            raise PocketLMError(f"{source}: not a saved conversation ({error})") from None
        return conv


def _ids_spelling_prefix(tokenizer: Tokenizer, ids: Seq[int], *, text: str) -> list[int]:
    """The longest prefix of `ids` whose bytes are a prefix of `text` ending on a whole
    character: the generated tokens that the recorded reply really contains (a stop string
    may have cut the text inside a token, and held-back text may never have been shown)."""
    target = text.encode("utf-8")
    size, good = 0, 0
    for n, token in enumerate(ids, start=1):
        piece = tokenizer.token_bytes(token)
        if target[size : size + len(piece)] != piece:
            break
        size += len(piece)
        try:
            target[:size].decode("utf-8")
            good = n
        except UnicodeDecodeError:
            pass  # mid-character: the next token may complete it
    return list(ids[:good])
