"""`pocketlm` command line: one module per subcommand, this file only dispatches.

Each subcommand module has `add_parser(subparsers)` and `main(args) -> int`. Only the
chosen subcommand's module is imported: `pocketlm --help` lists the table below, and
`pocketlm CMD --help` or an argument error never loads torch (the handlers import the
engine when they run). A `PocketLMError` becomes one line on stderr and exit code 1;
Ctrl-C exits 130. Nothing here knows how models work.
"""

import argparse
import importlib
import signal
import sys
import threading
from typing import NamedTuple

from pocketlm.errors import PocketLMError


class Command(NamedTuple):
    name: str  # as typed: `pocketlm NAME`
    module: str  # under pocketlm.cli; its add_parser registers NAME with this help
    help: str


# In the order `--help` lists them; tests/test_cli_startup.py keeps it equal to the modules.
COMMANDS = (
    Command("run", "run", "generate text from a prompt (streams as it goes)"),
    Command(
        "chat",
        "chat",
        "chat with a model (chat template, or a transcript harness for base models)",
    ),
    Command("pull", "pull", "download a model (a known name or a hub org/repo id)"),
    Command(
        "list",
        "list_models",
        "list the models on disk (pocketlm's store and the Hugging Face cache)",
    ),
    Command("show", "show", "describe a model: shape, parameters, quantization, RAM needed"),
    Command("models", "models", "list the model names pocketlm knows (pull or run them by name)"),
    Command("rm", "rm", "remove a model from pocketlm's store"),
    Command("finetune", "finetune", "fine-tune a model on your own text (full or LoRA)"),
    Command("export", "export", "write a model as a GGUF file (for llama.cpp and Ollama)"),
    Command("score", "score", "per-token log-probabilities of a text, with top-k alternatives"),
    Command("perplexity", "perplexity", "perplexity of a text file (sliding window)"),
    Command("embed", "embed", "hidden states / embeddings of texts, from any layer"),
    Command("probs", "probs", "the text coloured by each token's probability (HTML or PNG)"),
    Command("serve", "serve", "serve a model over an OpenAI-compatible HTTP API, with a chat page"),
    Command(
        "ps",
        "ps",
        "list the models a running server has loaded, their memory, when they unload",
    ),
    Command("bench", "bench", "measure decode/prefill speed and the memory-bandwidth bound"),
)


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the full subparser of the `chosen` command only: every other
    command is a placeholder with its name and help, enough for the listing."""
    from pocketlm import __version__

    parser = argparse.ArgumentParser(
        prog="pocketlm",
        description="Run GPT-2 and other open language models on your own machine.",
    )
    parser.add_argument("--version", action="version", version=f"pocketlm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        if command.name == chosen:
            importlib.import_module(f"pocketlm.cli.{command.module}").add_parser(subparsers)
        else:
            subparsers.add_parser(command.name, help=command.help)
    return parser


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in argv: the first word that is not an option (`pocketlm`
    itself takes no option with a value), if it is one of ours."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in {c.name for c in COMMANDS} else None


def main(argv: list[str] | None = None) -> int:
    with CtrlC() as ctrl_c:
        try:
            return _run(sys.argv[1:] if argv is None else argv)
        except PocketLMError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # also while a subcommand's modules are still importing
            print(file=sys.stderr)
            return 130
        except BrokenPipeError:
            return 0
        except Exception:
            # A Ctrl-C that cut an import short (torch importing numpy...) can leave a
            # half-made module that fails later in its own way: still the user's Ctrl-C.
            if not ctrl_c.pressed:
                raise
            print(file=sys.stderr)
            return 130


class CtrlC:
    """While the command runs, Ctrl-C raises KeyboardInterrupt as usual and is also
    remembered (`pressed`). Only where Python's own handler is in place, in the main
    thread; the handler before is put back afterwards."""

    def __init__(self) -> None:
        self.pressed = False
        self._before = None

    def __enter__(self) -> "CtrlC":
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._before = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._before is not None:
            signal.signal(signal.SIGINT, self._before)

    def _handle(self, signum: int, frame: object) -> None:
        self.pressed = True
        raise KeyboardInterrupt


def _run(argv: list[str]) -> int:
    parser = build_parser(chosen_command(argv))
    # argparse stops filling a `words*` positional at the first option, so the prompt in
    # `pocketlm run MODEL -t 0 "prompt"` comes back as an extra: give it to the words.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "words") or any(word.startswith("-") for word in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.words += extra
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return args.handler(args) or 0


if __name__ == "__main__":
    sys.exit(main())
