"""The interactive prompt: `pocketlm run [MODEL]` with no prompt, and `pocketlm chat`.

A read-eval-print loop in the spirit of `ollama run` and llama.cpp's interactive mode:
readline line editing with history in pocketlm's data folder, multi-line input (a `\"\"\"`
block or a trailing backslash), answers streamed as they are generated, Ctrl-C stops the
answer and a second Ctrl-C (or Ctrl-D) leaves, and slash commands (`/help` lists them).

Modes: `chat` keeps a `pocketlm.prompting.chat.Conversation` (chat template or transcript harness);
`completion` continues each input as plain text, or answers it few-shot with `--examples`.
Terminal input and output only; conversations, few-shot prompts and generation live in
`pocketlm.prompting.chat`, `pocketlm.prompting.fewshot` and `pocketlm.api`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pocketlm import paths
from pocketlm.cli import common
from pocketlm.cli.structured import read_schema, structured_options
from pocketlm.errors import PocketLMError
from pocketlm.generate.stream import Chunk, Stats
from pocketlm.prompting.chat import Conversation, Harness
from pocketlm.prompting.fewshot import FewShot

PROMPT, MORE = ">>> ", "... "
SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SESSION_VERSION = 1
# Probability buckets for --show-probs: (lowest probability, ANSI colour).
COLOURS = ((0.8, "\033[32m"), (0.5, "\033[33m"), (0.2, "\033[35m"), (0.0, "\033[31m"))
RESET = "\033[0m"
SAMPLING = {
    "temperature": float, "top_k": int, "top_p": float, "min_p": float,
    "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float,
}  # fmt: skip
HELP = """\
/set NAME VALUE   change a setting: temperature, top_k, top_p, min_p, repetition_penalty,
                  presence_penalty, frequency_penalty, seed (or none), logit_bias ID:BIAS,...,
                  max_tokens, stop TEXT (or none), system TEXT (chat),
                  schema FILE (answers are JSON valid under it; none: free text)
/show             the model card and the current settings
/mode MODE        chat (keeps a conversation) or completion (continues your text)
/save NAME        save this session (model, settings, conversation)
/load NAME        load a saved session
/clear            forget the conversation
/stats            tokens, time to first token and speed of the last answer
/probs            colour each token by its probability (toggle)
/help             this help
/bye              leave (also Ctrl-D, or Ctrl-C twice)
Multi-line input: start and end with \"\"\", or end a line with a backslash."""


def paint(chunk: Chunk) -> str:
    """The chunk's text coloured by its token's probability (uncoloured when unknown)."""
    if chunk.logprob is None or not chunk.text:
        return chunk.text
    probability = math.exp(chunk.logprob)
    colour = next(code for lowest, code in COLOURS if probability >= lowest)
    return f"{colour}{chunk.text}{RESET}"


def legend() -> str:
    names = ("p >= 0.8", "p >= 0.5", "p >= 0.2", "p < 0.2")
    return "probabilities: " + "  ".join(
        f"{code}{n}{RESET}" for (_, code), n in zip(COLOURS, names, strict=True)
    )


def few_shot_from_args(args: argparse.Namespace) -> FewShot | None:
    """The `--examples FILE` / `--template TEXT` few-shot setup, or None."""
    template = getattr(args, "template", None)
    if getattr(args, "examples", None) is None:
        if template:
            raise PocketLMError("--template is for few-shot prompting: give --examples FILE too")
        return None
    return FewShot.from_file(
        args.examples, template=common.unescape(template) if template else None
    )


@dataclass
class Session:
    """What the prompt is working with: the model, the settings and the conversation."""

    lm: Any  # pocketlm.LM
    model: str
    mode: str
    conversation: Conversation
    settings: dict[str, Any] = field(default_factory=dict)
    few_shot: FewShot | None = None
    show_probs: bool = False
    last_stats: Stats | None = None
    # The KV cache of completion and few-shot mode, kept so that a prompt extending the
    # last one computes only its new tokens (chat mode's is the conversation's own).
    cache: Any = None  # pocketlm.generate.engine.Session

    def __post_init__(self) -> None:
        if self.cache is None:
            self.cache = self.lm.session()

    def generation_options(self) -> dict[str, Any]:
        # Colouring by probability needs each token's log-probability.
        return {**self.settings, "logprobs": 0} if self.show_probs else dict(self.settings)


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    settings = {k: v for k, v in common.sampling_kwargs(args).items() if k in SAMPLING}
    settings.update(seed=args.seed, logit_bias=common.parse_logit_bias(args.logit_bias))
    settings.update(max_tokens=args.max_tokens, stop=[common.unescape(s) for s in args.stop])
    settings.update(structured_options(args))  # --json-schema, --json, --grammar
    return settings


def run_interactive(
    model_name: str | None, args: argparse.Namespace, *, mode: str | None = None
) -> int:
    """Load the model and talk with the person at the terminal until they leave."""
    common.setup_logging()
    shots = few_shot_from_args(args)
    harness_file = getattr(args, "harness", None)
    harness = Harness.from_file(harness_file) if harness_file else None
    settings = settings_from_args(args)
    lm = common.load_model(model_name, args)
    if mode is None:
        mode = "chat" if lm.tokenizer.chat_template and shots is None else "completion"
    conversation = Conversation(lm, system=getattr(args, "system", None), harness=harness)
    session = Session(
        lm,
        model_name or lm.name,
        mode,
        conversation,
        settings,
        shots,
        show_probs=getattr(args, "show_probs", False),
    )
    return Prompt(session, args).loop()


class Prompt:
    """The read-eval-print loop."""

    def __init__(self, session: Session, args: argparse.Namespace) -> None:
        self.session = session
        self.args = args
        self.tty = sys.stdin.isatty()
        self.interrupted = False  # the last thing that happened was a Ctrl-C
        self.commands: dict[str, Callable[[str], bool | None]] = {
            "/set": self.cmd_set, "/show": self.cmd_show, "/mode": self.cmd_mode,
            "/save": self.cmd_save, "/load": self.cmd_load, "/clear": self.cmd_clear,
            "/stats": self.cmd_stats, "/probs": self.cmd_probs, "/help": self.cmd_help,
            "/?": self.cmd_help, "/bye": self.cmd_bye, "/exit": self.cmd_bye, "/quit": self.cmd_bye,
        }  # fmt: skip

    def loop(self) -> int:
        with _history(enabled=self.tty):
            if self.tty:
                self.say(self.banner())
            while True:
                try:
                    text = self.read()
                except EOFError:
                    break
                except KeyboardInterrupt:
                    if self.interrupted:
                        break
                    self.interrupted = True
                    self.say("\n(Ctrl-C again or Ctrl-D to leave)")
                    continue
                self.interrupted = False
                if self.handle(text):
                    break
        if self.tty:
            self.say("")
        return 0

    def banner(self) -> str:
        s = self.session
        kind = "chat template" if s.conversation.uses_template else "transcript harness"
        what = f"chat mode ({kind})" if s.mode == "chat" else "completion mode"
        if s.mode == "completion" and s.few_shot:
            what += f" with {len(s.few_shot.examples)} few-shot examples"
        return f"pocketlm · {s.model} · {what} · /help for commands, Ctrl-D to leave"

    def say(self, text: str) -> None:
        print(text, flush=True)

    def read(self) -> str:
        """One message: a line, a line ending in a backslash and what follows, or a
        \"\"\" block."""
        line = input(PROMPT if self.tty else "")
        if line.lstrip().startswith('"""'):
            lines = [line.lstrip()[3:]]
            while not lines[-1].rstrip().endswith('"""'):
                lines.append(input(MORE if self.tty else ""))
            lines[-1] = lines[-1].rstrip()[:-3]
            return "\n".join(lines).strip("\n")
        lines = [line]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input(MORE if self.tty else ""))
        return "\n".join(lines)

    def handle(self, text: str) -> bool:
        """Run one input; True means leave."""
        if not text.strip():
            return False
        try:
            if text.startswith("/") and "\n" not in text:
                name, _, rest = text.strip().partition(" ")
                command = self.commands.get(name.lower())
                if command is None:
                    self.error(f"unknown command {name}; /help lists the commands")
                    return False
                return bool(command(rest.strip()))
            self.answer(text)
        except PocketLMError as error:
            self.error(str(error))
        return False

    def error(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)

    # -- answering --

    def answer(self, text: str) -> None:
        s = self.session
        options = s.generation_options()
        if s.mode == "chat":
            chunks = s.conversation.send(text, **options)
        elif s.few_shot is not None:
            chunks = s.few_shot.stream(s.cache, text, **options)
        else:
            chunks = s.cache.stream(text, **options)
        try:
            with contextlib.closing(chunks):
                self.show(chunks)
        except KeyboardInterrupt:
            self.interrupted = True
            sys.stdout.write(RESET if s.show_probs and common.colour_output(sys.stdout) else "")
            self.say("\n[stopped]")
            return
        self.say("")

    def show(self, chunks: Iterator[Chunk]) -> None:
        paint_it = self.session.show_probs and common.colour_output(sys.stdout)
        for chunk in chunks:
            sys.stdout.write(paint(chunk) if paint_it else chunk.text)
            sys.stdout.flush()
            if chunk.stats is not None:  # the last chunk: what the answer cost
                self.session.last_stats = chunk.stats

    # -- commands --

    def cmd_help(self, _: str) -> None:
        self.say(HELP)

    def cmd_bye(self, _: str) -> bool:
        return True

    def cmd_probs(self, _: str) -> None:
        self.session.show_probs = not self.session.show_probs
        self.say(legend() if self.session.show_probs else "probabilities off")

    def cmd_clear(self, _: str) -> None:
        self.session.conversation.clear()
        self.say("conversation cleared")

    def cmd_mode(self, value: str) -> None:
        if value not in ("chat", "completion"):
            raise PocketLMError(f"/mode takes chat or completion (got {value or 'nothing'!r})")
        self.session.mode = value
        self.say(self.banner())

    def cmd_stats(self, _: str) -> None:
        stats = self.session.last_stats
        if stats is None:
            raise PocketLMError("no answer yet: /stats describes the last answer")
        self.say(
            f"prompt tokens {stats.prompt_tokens} ({stats.prefilled_tokens} computed, the rest "
            f"from the cache)  new tokens {stats.new_tokens}  time to first token "
            f"{stats.time_to_first_token * 1000:.0f} ms  speed {stats.tokens_per_second:.1f} tokens/s"
            f"  threads {self.args.threads_used}  model load {self.args.load_seconds:.2f} s"
        )

    def cmd_set(self, text: str) -> None:
        name, _, value = text.partition(" ")
        name, value = name.replace("-", "_").lower(), value.strip()
        if not name or not value:
            raise PocketLMError("usage: /set NAME VALUE, e.g. /set temperature 0.7")
        s = self.session
        if name == "system":
            s.conversation.system = None if value.lower() == "none" else common.unescape(value)
            self.say(f"system prompt: {s.conversation.system or '(the default)'}")
            return
        candidate = {**s.settings, name: parse_setting(name, value)}
        check_settings(candidate, lm=s.lm)
        s.settings = candidate
        self.say(f"{name} = {format_value(candidate[name])}")

    def cmd_show(self, _: str) -> None:
        from pocketlm.weights.card import describe, human_count

        s = self.session
        card = describe(s.lm.path, name=s.model)
        rows = [
            ("model", s.model), ("path", str(card.path)),
            ("architecture", card.architecture), ("parameters", human_count(card.parameters)),
            ("context length", str(card.context)), ("quantization", card.quantization),
            ("mode", s.mode),
            ("chat format", "chat template" if s.conversation.uses_template else "transcript harness"),
            ("system prompt", s.conversation.system or "(the default)"),
            ("turns", f"{len(s.conversation.turns)} ({s.conversation.dropped_turns} dropped)"),
            ("show probs", "on" if s.show_probs else "off"),
        ]  # fmt: skip
        rows += [(name, format_value(value)) for name, value in s.settings.items()]
        width = max(len(name) for name, _ in rows)
        self.say("\n".join(f"{name.ljust(width)}  {value}" for name, value in rows))

    def cmd_save(self, name: str) -> None:
        path = session_path(name)
        s = self.session
        data = {
            "version": SESSION_VERSION, "model": s.model, "mode": s.mode, "settings": s.settings,
            "show_probs": s.show_probs, "conversation": s.conversation.to_dict(),
        }  # fmt: skip
        write_atomically(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")
        self.say(f"saved session {name} ({path})")

    def cmd_load(self, name: str) -> None:
        path = session_path(name)
        data = read_session(path)
        s = self.session
        session = s.conversation.session  # the same model's cache may hold the text
        if data["model"] != s.model:
            self.say(f"loading {data['model']} ...")
            s.lm = common.load_model(data["model"], self.args)
            s.model, s.cache, session = data["model"], s.lm.session(), None
        settings = {**s.settings, **data["settings"]}
        check_settings(settings, lm=s.lm)
        s.conversation = Conversation.from_dict(
            s.lm, data["conversation"], source=str(path), session=session
        )
        s.settings, s.mode, s.show_probs = settings, data["mode"], bool(data.get("show_probs"))
        self.say(f"loaded session {name}: {len(s.conversation.turns)} turns, {s.mode} mode")
        for turn in s.conversation.turns[-2:]:
            self.say(f"  you: {turn.user}\n  model: {turn.reply}")


def parse_setting(name: str, value: str) -> Any:
    """A /set value as the type its setting wants; a one-line error otherwise."""
    off = value.lower() in ("none", "off")
    if name in SAMPLING:
        kind = SAMPLING[name]
    elif name in ("seed", "max_tokens"):
        if name == "seed" and off:
            return None
        kind = int
    elif name == "logit_bias":
        return {} if off else common.parse_logit_bias(value)
    elif name == "stop":
        return [] if off else [common.unescape(value)]
    elif name == "schema":
        return None if off else read_schema(value)
    else:
        names = ", ".join(
            [*SAMPLING, "seed", "logit_bias", "max_tokens", "stop", "system", "schema"]
        )
        raise PocketLMError(f"unknown setting {name!r}; settings are: {names}")
    try:
        return kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise PocketLMError(f"{name} needs {what} (got {value!r})") from None


def check_settings(settings: dict[str, Any], *, lm: Any) -> None:
    """Refuse settings the engine would refuse (pocketlm.generate.params), now."""
    lm.params(**settings)


def format_value(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(repr(v) for v in value) or "(none)"
    if isinstance(value, dict) and any(isinstance(k, str) for k in value):  # a JSON schema
        return json.dumps(value)
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items()) or "(none)"
    return "(none)" if value is None else str(value)


def session_path(name: str) -> Path:
    if not SESSION_NAME.fullmatch(name):
        raise PocketLMError(
            f"session names are letters, digits, '.', '_' and '-' (got {name or 'nothing'!r})"
        )
    return paths.sessions_dir() / f"{name}.json"


def read_session(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PocketLMError(f"no saved session {path.stem!r} (in {path.parent})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PocketLMError(f"{path}: not a readable session ({error})") from None
    if not isinstance(data, dict) or data.get("version") != SESSION_VERSION:
        raise PocketLMError(f"{path}: not a pocketlm session (version {SESSION_VERSION})")
    ok = (
        isinstance(data.get("model"), str)
        and isinstance(data.get("settings"), dict)
        and data.get("mode") in ("chat", "completion")
        and isinstance(data.get("conversation"), dict)
    )
    if not ok:
        raise PocketLMError(f"{path}: a session needs model, mode, settings and conversation")
    bias = data["settings"].get("logit_bias")
    if isinstance(bias, dict):  # JSON object keys are strings; token ids are ints
        try:
            data["settings"]["logit_bias"] = {int(k): v for k, v in bias.items()}
        except ValueError:
            raise PocketLMError(f"{path}: logit_bias keys must be token ids") from None
    return data


def write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and os.replace: a crash leaves the old
    file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False
    ) as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


@contextlib.contextmanager
def _history(*, enabled: bool) -> Iterator[None]:
    """readline line editing, with history read from and saved to `paths.history_file()`."""
    try:
        import readline
    except ImportError:  # no readline on this platform: plain input() still works
        enabled = False
    if not enabled:
        yield
        return
    file = paths.history_file()
    readline.set_history_length(1000)
    with contextlib.suppress(OSError):
        readline.read_history_file(file)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f".{file.name}.tmp")
            readline.write_history_file(tmp)
            os.replace(tmp, file)
