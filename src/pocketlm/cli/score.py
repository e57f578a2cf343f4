"""`pocketlm score MODEL "text"`: every token's log-probability and the top-k
alternatives the model preferred, as a table or JSON. Printing only; the numbers come
from `pocketlm.features.scores.token_logprobs`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING

from pocketlm.cli import common
from pocketlm.errors import PocketLMError

if TYPE_CHECKING:  # pocketlm.features.scores imports torch: the CLI starts without it
    from pocketlm.features.scores import TokenScore
    from pocketlm.tokenizer import Tokenizer


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="per-token log-probabilities of a text, with top-k alternatives",
        description="Score TEXT under MODEL: each token's log-probability given the text "
        "before it, and the K tokens the model found most likely there.",
    )
    parser.add_argument("model", metavar="MODEL", help="model name, folder or .gguf file")
    parser.add_argument("text", metavar="TEXT", help="the text to score ('-' reads stdin)")
    parser.add_argument(
        "-k", "--top-k", type=int, default=3, help="alternatives per token (default 3)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    common.add_model_options(parser)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    common.setup_logging()
    text = sys.stdin.read() if args.text == "-" else args.text
    if not text:
        raise PocketLMError("the text is empty: give some text to score")
    if args.top_k < 0:
        raise PocketLMError(f"--top-k must be 0 or more (got {args.top_k})")
    lm = common.load_model(args.model, args)
    scores = lm.score(text, top_k=args.top_k)
    if args.json:
        print(json.dumps(to_json(scores, lm.tokenizer, model=lm.name)))
    else:
        print_table(scores, lm.tokenizer)
    return 0


def token_label(tokenizer: Tokenizer, token: int) -> str:
    """A token as a quoted literal: its text, or its bytes when they are part of a
    UTF-8 character (b'\\xe6')."""
    data = tokenizer.token_bytes(token)
    try:
        return repr(data.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(data)


def to_json(scores: list[TokenScore], tokenizer: Tokenizer, *, model: str) -> dict:
    def entry(token: int, logprob: float | None) -> dict:
        data = tokenizer.token_bytes(token)
        text = data.decode("utf-8", errors="replace")
        return {"id": token, "text": text, "bytes": list(data), "logprob": logprob}

    tokens = [
        {**entry(s.token, s.logprob), "top": [entry(i, lp) for i, lp in s.top]} for s in scores
    ]
    total = sum(s.logprob for s in scores[1:])
    return {"model": model, "tokens": tokens, "total_logprob": total, "scored": len(scores) - 1}


def print_table(scores: list[TokenScore], tokenizer: Tokenizer) -> None:
    shown = [token_label(tokenizer, s.token) for s in scores]
    width = min(24, max(len(t) for t in shown))
    print(f"{'#':>4}  {'token':<{width}}  {'id':>6}  {'logprob':>8}  {'prob':>7}  top alternatives")
    for i, (s, text) in enumerate(zip(scores, shown, strict=True)):
        if s.logprob is None:
            numbers = f"{'-':>8}  {'-':>7}"
        else:
            numbers = f"{s.logprob:>8.3f}  {_percent(s.logprob):>7}"
        top = "  ".join(f"{token_label(tokenizer, t)} {_percent(lp)}" for t, lp in s.top)
        print(f"{i:>4}  {text:<{width}}  {s.token:>6}  {numbers}  {top}")
    scored = scores[1:]
    if scored:
        total = sum(s.logprob for s in scored)
        print(
            f"total logprob {total:.3f} over {len(scored)} tokens "
            f"(perplexity {math.exp(-total / len(scored)):.3f})"
        )


def _percent(logprob: float) -> str:
    """A probability as a percentage, in scientific notation when tiny."""
    p = math.exp(logprob) * 100
    return f"{p:.1f}%" if p >= 0.1 else f"{p:.0e}%".replace("e-0", "e-")
