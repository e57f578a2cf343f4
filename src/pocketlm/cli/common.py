"""Options and helpers several subcommands share: model loading, sampling flags, output.

Parsing and printing only; the work is done by `pocketlm.api`.
"""

import argparse
import logging
import re
import sys

from pocketlm.errors import PocketLMError
from pocketlm.generate import CONTEXT, LOOKAHEAD, MAX_TOKENS


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "bf16", "fp16"],
        help="weight dtype (default: a GGUF file's own quantization, kept as stored; else fp32)",
    )
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    group.add_argument(
        "--offline", action="store_true", help="never touch the network (also HF_HUB_OFFLINE=1)"
    )
    group.add_argument(
        "--ctx-size",
        type=int,
        default=None,
        metavar="N",
        help=f"context window in tokens (default: the model's, at most {CONTEXT})",
    )
    group.add_argument(
        "--quantize",
        default=None,
        choices=["int8", "int4"],
        help="int8: weight-only int8 (4x fewer bytes read per token than fp32); int4: 4-bit "
        "groups of 32 on the CPU (a Q4_0/Q4_1 GGUF keeps its own codes)",
    )
    group.add_argument(
        "--draft",
        default=None,
        metavar="MODEL",
        help="speculative decoding with MODEL (same tokenizer, smaller) drafting; the "
        "model itself quantized (--draft-quantize) is a draft too",
    )
    group.add_argument(
        "--draft-quantize",
        default=None,
        choices=["int8", "int4"],
        help="quantize the draft so (default: as the model)",
    )
    group.add_argument(
        "--lookahead",
        type=int,
        default=LOOKAHEAD,
        metavar="N",
        help=f"tokens the draft proposes a round (default: {LOOKAHEAD})",
    )


def add_compile_option(parser: argparse.ArgumentParser) -> None:
    """--compile, for the commands that decode one sequence token by token (run, chat)."""
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decode through torch.compile: one compiled step instead of Python per layer "
        "(the first run compiles for about a minute; cached on disk after)",
    )


def add_sampling_options(parser: argparse.ArgumentParser, *, temperature: float = 0.7) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "-n",
        "--max-tokens",
        type=int,
        default=MAX_TOKENS,
        help=f"new tokens at most (default {MAX_TOKENS})",
    )
    group.add_argument(
        "-t",
        "--temperature",
        type=float,
        default=temperature,
        help=f"0 is greedy (default {temperature})",
    )
    group.add_argument(
        "--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)"
    )
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    group.add_argument(
        "--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability"
    )
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--presence-penalty", type=float, default=0.0)
    group.add_argument("--frequency-penalty", type=float, default=0.0)
    group.add_argument(
        "--logit-bias",
        default=None,
        metavar="ID:BIAS[,ID:BIAS]",
        help="add BIAS to token ID's logit, e.g. 50256:-100",
    )
    group.add_argument(
        "--seed", type=int, default=None, help="same seed + same input = same output"
    )
    group.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when TEXT appears (repeatable; \\n is a newline)",
    )


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling options as keyword arguments for `LM.generate` / `LM.stream`."""
    return dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        logit_bias=parse_logit_bias(args.logit_bias),
        seed=args.seed,
    )


def parse_logit_bias(text: str | None) -> dict[int, float]:
    if not text:
        return {}
    bias = {}
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(-?[\d.]+)\s*", item)
        if not match:
            raise PocketLMError(f"--logit-bias item {item!r} is not ID:BIAS (e.g. 50256:-100)")
        bias[int(match[1])] = float(match[2])
    return bias


def unescape(text: str) -> str:
    """Let `--stop '\\n'` mean a newline, as people type it in a shell."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def load_model(name: str | None, args: argparse.Namespace):  # -> pocketlm.LM
    """Load the model the options describe, then take the steps they ask for: a draft
    for speculative decoding (--draft, --draft-quantize, --lookahead), compilation."""
    # torch: imported only once a command really loads a model
    from pocketlm.api import load
    from pocketlm.generate.speculative import check_lookahead

    draft, draft_quantize = getattr(args, "draft", None), getattr(args, "draft_quantize", None)
    if draft_quantize is not None and draft is None:
        raise PocketLMError("--draft-quantize needs a draft model: name one with --draft MODEL")
    lookahead = getattr(args, "lookahead", LOOKAHEAD)
    check_lookahead(lookahead)  # before loading two models, not after
    options = dict(
        dtype=args.dtype, device=args.device, offline=args.offline, context=args.ctx_size
    )
    quantize = getattr(args, "quantize", None)
    lm = load(name, quantize=quantize, adapter=getattr(args, "adapter", None), **options)
    if draft is not None:
        lm.use_draft(
            load(draft, quantize=draft_quantize or quantize, **options), lookahead=lookahead
        )
    if getattr(args, "compile", False):
        lm.compile()  # now, while loading: no answer pays for it
    return lm


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (not the stream it was created with), so a
    redirected or replaced stderr never receives writes meant for a closed one."""

    @property
    def stream(self):  # noqa: ANN201 - logging's own attribute
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


def setup_logging() -> None:
    """Library warnings (a truncated prompt...) go to stderr as one line each."""
    logger = logging.getLogger("pocketlm")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logging.addLevelName(logging.WARNING, "warning")
