"""`pocketlm perplexity MODEL FILE`: the perplexity of a text file under a model.

The sliding-window method of the transformers perplexity guide (`pocketlm.features`);
a progress bar on stderr, the result on stdout (`--json` for machines). Printing only.
"""

import argparse
import json
import sys

from pocketlm.cli import common
from pocketlm.cli.files import read_text
from pocketlm.errors import PocketLMError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "perplexity",
        help="perplexity of a text file (sliding window)",
        description="Perplexity of FILE (UTF-8 text) under MODEL, with the strided "
        "sliding-window method of the transformers perplexity guide.",
    )
    parser.add_argument("model", metavar="MODEL", help="model name, folder or .gguf file")
    parser.add_argument("file", metavar="FILE", help="a UTF-8 text file ('-' reads stdin)")
    parser.add_argument(
        "--context",
        type=int,
        default=None,
        help="tokens per window (default: the context window, see --ctx-size)",
    )
    parser.add_argument(
        "--stride", type=int, default=None, help="tokens between windows (default: context / 2)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    common.add_model_options(parser)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    common.setup_logging()
    text = sys.stdin.read() if args.file == "-" else read_text(args.file)
    if not text.strip():
        raise PocketLMError(f"{args.file} is empty: there is no text to measure")
    lm = common.load_model(args.model, args)
    result = lm.perplexity(text, context=args.context, stride=args.stride, progress=_ProgressBar())
    if args.json:
        print(json.dumps({"model": lm.name, "file": args.file, **vars(result)}))
        return 0
    print(f"perplexity: {result.perplexity:.4f}")
    print(f"nll: {result.nll:.4f} nats/token")
    print(
        f"tokens: {result.tokens} ({result.scored} scored) in {result.windows} "
        f"window{'s' * (result.windows != 1)} of {result.context}, stride {result.stride}"
    )
    return 0


class _ProgressBar:
    """A tqdm bar on stderr, opened at the first window (when the total is known)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, unit="window", file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)
        if done == total:
            self.bar.close()
