"""`pocketlm embed MODEL INPUT... --out FILE`: hidden states of any layer, pooled or per
token, saved as .npy (a float32 array) or .jsonl (one JSON object per input).

An INPUT is a text, or @FILE: a UTF-8 file with one text per line (blank lines are
skipped). The output file is written atomically. Printing and files only; the vectors
come from `pocketlm.features.hidden.embed`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pocketlm.cli import common
from pocketlm.cli.files import read_text, write_atomic
from pocketlm.errors import PocketLMError
from pocketlm.features import POOLS

if TYPE_CHECKING:
    from pocketlm.features.hidden import Embeddings

FORMATS = (".npy", ".jsonl")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="hidden states / embeddings of texts, from any layer",
        description="Hidden states of MODEL for each INPUT (a text, or @FILE with one "
        "text per line), from any layer, pooled or per token.",
    )
    parser.add_argument("model", metavar="MODEL", help="model name, folder or .gguf file")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="a text, or @FILE")
    parser.add_argument(
        "--layer",
        type=int,
        default=-1,
        help="0 = embeddings, i = after block i, -1 = final (default -1)",
    )
    parser.add_argument(
        "--pool",
        choices=POOLS,
        default="mean",
        help="mean or last token, or none for every token (default mean)",
    )
    parser.add_argument("--normalize", action="store_true", help="scale vectors to unit length")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per forward pass")
    parser.add_argument("--out", required=True, help="output file: .npy or .jsonl")
    common.add_model_options(parser)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    common.setup_logging()
    out = Path(args.out)
    if out.suffix not in FORMATS:
        raise PocketLMError(f"--out must end in .npy or .jsonl (got {out.name})")
    texts = read_inputs(args.inputs)
    if out.suffix == ".npy" and args.pool == "none" and len(texts) > 1:
        raise PocketLMError(
            "per-token vectors of several texts differ in length: write them to a .jsonl file"
        )
    import numpy as np  # here, not at the top: `pocketlm --help` starts without it

    lm = common.load_model(args.model, args)
    result = lm.embed(
        texts,
        layer=args.layer,
        pool=args.pool,
        normalize=args.normalize,
        batch_size=args.batch_size,
    )
    if out.suffix == ".npy":
        array = np.stack([v.numpy() for v in result.vectors])
        write_atomic(out, lambda f: np.save(f, array[0] if args.pool == "none" else array))
    else:
        write_atomic(out, lambda f: f.write(to_jsonl(texts, result).encode("utf-8")))
    dim = result.vectors[0].shape[-1]
    print(
        f"wrote {len(texts)} {'per-token ' * (args.pool == 'none')}embedding"
        f"{'s' * (len(texts) != 1)} of {dim} (layer {result.layer}, pool {args.pool}) to {out}",
        file=sys.stderr,
    )
    return 0


def read_inputs(inputs: list[str]) -> list[str]:
    """Texts from the INPUT arguments: @FILE gives its non-blank lines."""
    texts = []
    for item in inputs:
        if item.startswith("@"):
            lines = [line for line in read_text(item[1:]).splitlines() if line.strip()]
            if not lines:
                raise PocketLMError(f"{item[1:]} has no text in it (one text per line)")
            texts.extend(lines)
        elif not item:
            raise PocketLMError("an INPUT is empty: give some text to embed")
        else:
            texts.append(item)
    return texts


def to_jsonl(texts: list[str], result: Embeddings) -> str:
    lines = (
        json.dumps({"index": i, "text": text, "tokens": n, "embedding": vector.tolist()})
        for i, (text, n, vector) in enumerate(
            zip(texts, result.tokens, result.vectors, strict=True)
        )
    )
    return "".join(line + "\n" for line in lines)
