"""`pocketlm show [NAME]`: a model's card: shape, parameters, quantization, memory needs.

Never downloads: a known name that is not on disk shows its catalogue entry instead.
Printing only.
"""

import argparse

from pocketlm.errors import ModelNotFoundError
from pocketlm.weights import catalog
from pocketlm.weights.card import ModelCard, describe, human_bytes, human_count
from pocketlm.weights.sources import REPO_ID, resolve


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "show",
        help="describe a model: shape, parameters, quantization, RAM needed",
        description="Show a model's card (default: the embedded default model).",
    )
    parser.add_argument("name", nargs="?", default=None, help="model name, folder or .gguf file")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    try:
        path = resolve(args.name, offline=True)
    except ModelNotFoundError as error:
        entry = catalog.lookup(args.name or catalog.DEFAULT_MODEL)
        if entry is None and REPO_ID.match(args.name or ""):
            raise ModelNotFoundError(
                f"'{args.name}' is not on disk; `pocketlm pull {args.name}` downloads it"
            ) from error
        if entry is None:
            raise
        _print_fields(_entry_fields(entry))
        return 0
    _print_fields(_card_fields(describe(path)))
    return 0


def _card_fields(card: ModelCard) -> list[tuple[str, str]]:
    runs = "native" if card.native else "through transformers (no native module; slower)"
    return [
        ("name", card.name),
        ("path", str(card.path)),
        ("architecture", f"{card.architecture}, runs {runs}"),
        ("family", card.family),
        ("features", ", ".join(card.features)),
        ("parameters", f"{card.parameters:,} ({human_count(card.parameters)})"),
        ("layers", str(card.layers)),
        ("heads", str(card.heads)),
        ("kv heads", str(card.kv_heads)),
        ("embedding width", str(card.width)),
        ("context length", str(card.context)),
        ("vocab size", str(card.vocab)),
        ("quantization", card.quantization),
        *([("tensor types", _mix(card))] if card.type_mix else []),
        ("file size", human_bytes(card.file_size)),
        ("ram default", f"{human_bytes(card.ram_default)} ({_default_mode(card)})"),
        ("ram fp32", human_bytes(card.ram_fp32)),
        ("ram bf16", human_bytes(card.ram_bf16)),
        ("ram int8", human_bytes(card.ram_int8)),
        ("ram int4", human_bytes(card.ram_int4)),
        ("ram note", card.ram_note),
        ("kv cache", f"{human_bytes(card.kv_cache_per_token_bf16 * 1024)} per 1k tokens (bf16)"),
    ]


def _mix(card: ModelCard) -> str:
    """'Q4_K 71%, Q6_K 27%, F32 2%': each tensor type's share of the file's bytes."""
    total = sum(size for _, size in card.type_mix) or 1
    return ", ".join(f"{kind} {100 * size / total:.0f}%" for kind, size in card.type_mix)


def _default_mode(card: ModelCard) -> str:
    if card.type_mix:
        return "as stored: quantized matrices kept as the file has them, the rest fp32"
    return "fp32"


def _entry_fields(entry: catalog.CatalogEntry) -> list[tuple[str, str]]:
    return [
        ("name", entry.name),
        ("path", f"not on disk: `pocketlm pull {entry.name}` downloads it"),
        ("source", entry.source),
        ("architecture", entry.architecture),
        ("parameters", f"{entry.parameters:,} ({entry.size})"),
        ("layers", str(entry.layers)),
        ("heads", str(entry.heads)),
        ("kv heads", str(entry.kv_heads)),
        ("embedding width", str(entry.width)),
        ("context length", str(entry.context)),
        ("vocab size", str(entry.vocab)),
        ("license", entry.license),
    ]


def _print_fields(fields: list[tuple[str, str]]) -> None:
    width = max(len(key) for key, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {value}")
