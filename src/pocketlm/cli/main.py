"""`pocketlm` command line: one module per subcommand, this file only dispatches.

Each subcommand module has `add_parser(subparsers)` and `main(args) -> int`. A
`PocketLMError` becomes one line on stderr and exit code 1; Ctrl-C exits 130. Nothing
here knows how models work.
"""

import argparse
import importlib
import sys

from pocketlm.errors import PocketLMError

# Subcommand modules under pocketlm.cli, in the order `--help` lists them.
COMMANDS = [
    "run",
    "chat",
    "pull",
    "list_models",
    "show",
    "models",
    "rm",
    "finetune",
    "score",
    "perplexity",
    "embed",
    "probs",
    "serve",
    "bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pocketlm",
        description="Run GPT-2 and other open language models on your own machine.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"pocketlm.cli.{name}")
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
    try:
        return args.handler(args) or 0
    except PocketLMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
