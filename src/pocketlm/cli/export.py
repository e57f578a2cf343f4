"""`pocketlm export MODEL --gguf [--out FILE] [--type f16]`: write a model (a fine-tune in
the store, a folder, a GGUF) as one GGUF file for llama.cpp and Ollama. Printing only; the
work is `pocketlm.train.gguf_export`.
"""

import argparse
from pathlib import Path

from pocketlm.cli import common
from pocketlm.errors import PocketLMError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a model as a GGUF file (for llama.cpp and Ollama)",
        description="Write MODEL (a fine-tune's name, a folder or a .gguf) as one GGUF file "
        "with its tokenizer and chat template, so llama.cpp and Ollama run it too.",
    )
    parser.add_argument("model", metavar="MODEL", help="model name, folder or .gguf file")
    parser.add_argument(
        "--gguf", action="store_true", required=True, help="write a GGUF file (the one format)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, metavar="FILE", help="the file (default: MODEL.gguf)"
    )
    parser.add_argument(
        "--type",
        default="f16",
        choices=["f32", "f16", "bf16", "q8_0"],
        help="the matrices' type (default f16; norms and biases stay f32)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    common.setup_logging()
    out = args.out or Path(f"{Path(args.model).name.removesuffix('.gguf')}.gguf")
    if out.exists() and not args.overwrite:
        raise PocketLMError(f"{out} already exists; choose another --out or pass --overwrite")
    from pocketlm.train.gguf_export import export_gguf  # torch: only once it runs

    written = export_gguf(args.model, out, qtype=args.type)
    size = written.stat().st_size
    print(f"wrote {written} ({size / 1e6:.1f} MB, {args.type})")
    return 0
