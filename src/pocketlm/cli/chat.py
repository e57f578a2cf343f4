"""`pocketlm chat [MODEL]`: talk with a model, turn by turn, in the terminal.

Instruct models get their chat template; base models such as GPT-2 a transcript harness
(`--harness FILE` replaces the default one). The loop itself is `cli.interactive`;
this file only parses arguments.
"""

import argparse

from pocketlm.cli import common


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a model (chat template, or a transcript harness for base models)",
        description="A conversation with MODEL (default: the embedded SmolLM2-135M-Instruct). "
        "Type /help inside for commands; Ctrl-C stops an answer, Ctrl-D leaves.",
    )
    parser.add_argument("model", nargs="?", default=None, help="model name, folder or .gguf file")
    parser.add_argument("--system", default=None, metavar="TEXT", help="the system prompt")
    parser.add_argument(
        "--harness",
        default=None,
        metavar="FILE",
        help="transcript harness for base models: YAML/JSON with intro, user, assistant, "
        "examples (or a .txt intro)",
    )
    parser.add_argument(
        "--show-probs", action="store_true", help="colour each token by its probability"
    )
    common.add_model_options(parser, draft=True)
    common.add_compile_option(parser)
    common.add_sampling_options(parser)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from pocketlm.cli.interactive import run_interactive

    return run_interactive(args.model, args, mode="chat")
