"""`pocketlm probs MODEL "text" --out view.html|view.png`: the text with each token
coloured by the probability the model gave it (red: surprising, green: expected).

The HTML page is self-contained (inline style, no scripts or fonts fetched); hovering a
token shows its probability and the model's top alternatives. The PNG is drawn with
matplotlib (the `plot` extra) in a monospace grid. Both are written atomically. Files
only; the numbers come from `pocketlm.features.scores.token_logprobs`.
"""

from __future__ import annotations

import argparse
import colorsys
import html
import math
import sys
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pocketlm.cli import common
from pocketlm.cli.files import write_atomic
from pocketlm.errors import PocketLMError

if TYPE_CHECKING:  # pocketlm.features.scores imports torch: the CLI starts without it
    from pocketlm.features.scores import TokenScore
    from pocketlm.tokenizer import Tokenizer

NO_SCORE = "#dddddd"  # the first token: nothing came before it


@dataclass
class Piece:
    """The text one token completes (possibly "" mid-character), and its probability."""

    text: str
    token: int
    prob: float | None
    top: list[tuple[str, float]]  # (alternative's text, probability)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "probs",
        help="the text coloured by each token's probability (HTML or PNG)",
        description="Colour each token of TEXT by the probability MODEL gave it, "
        "into a self-contained HTML page or a PNG image.",
    )
    parser.add_argument("model", metavar="MODEL", help="model name, folder or .gguf file")
    parser.add_argument("text", metavar="TEXT", help="the text to colour ('-' reads stdin)")
    parser.add_argument("--out", required=True, help="output file: .html or .png")
    parser.add_argument("-k", "--top-k", type=int, default=5, help="alternatives shown on hover")
    common.add_model_options(parser)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    common.setup_logging()
    out = Path(args.out)
    if out.suffix not in (".html", ".png"):
        raise PocketLMError(f"--out must end in .html or .png (got {out.name})")
    text = sys.stdin.read() if args.text == "-" else args.text
    if not text:
        raise PocketLMError("the text is empty: give some text to colour")
    if args.top_k < 0:
        raise PocketLMError(f"--top-k must be 0 or more (got {args.top_k})")
    lm = common.load_model(args.model, args)
    pieces = to_pieces(lm.score(text, top_k=args.top_k), lm.tokenizer)
    title = f"{lm.name}: token probabilities"
    if out.suffix == ".html":
        page = render_html(pieces, title=title)
        write_atomic(out, lambda f: f.write(page.encode("utf-8")))
    else:
        write_atomic(out, lambda f: render_png(pieces, f, title=title))
    print(f"wrote {out} ({len(pieces)} tokens)", file=sys.stderr)
    return 0


def to_pieces(scores: list[TokenScore], tokenizer: Tokenizer) -> list[Piece]:
    """Each token's share of the text, decoded so no piece carries broken UTF-8."""
    decoder = tokenizer.stream_decoder()
    pieces = []
    for s in scores:
        prob = None if s.logprob is None else math.exp(s.logprob)
        top = [(_show(tokenizer, i), math.exp(lp)) for i, lp in s.top]
        pieces.append(Piece(decoder.feed(s.token), s.token, prob, top))
    if pieces:
        pieces[-1].text += decoder.flush()
    return pieces


def colour(prob: float | None) -> str:
    """Hex colour of a probability: hue from red (0) through yellow to green (1)."""
    if prob is None:
        return NO_SCORE
    r, g, b = colorsys.hls_to_rgb(prob / 3, 0.78, 0.75)  # hue 0..120 degrees
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def _show(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.token_bytes(token).decode("utf-8", errors="replace")


def _tooltip(piece: Piece) -> str:
    if piece.prob is None:
        return f"{piece.text!r}: first token, no probability"
    lines = [f"{piece.text!r} (id {piece.token}): p = {piece.prob:.4f}"]
    lines += [f"  {text!r}: {p:.4f}" for text, p in piece.top]
    return "\n".join(lines)


HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: ui-monospace, monospace; max-width: 60rem; margin: 2rem auto; }}
.text {{ white-space: pre-wrap; line-height: 1.9; font-size: 1.05rem; }}
.text span {{ border-radius: 3px; }}
.legend span {{ padding: 0 0.6rem; }}
</style></head><body>
<h1 style="font-size: 1.1rem">{title}</h1>
<p class="legend">probability: {legend} <span style="background: {no_score}">first token</span></p>
<div class="text">{body}</div>
</body></html>
"""


def render_html(pieces: list[Piece], *, title: str) -> str:
    spans = []
    for piece in pieces:
        prob = "" if piece.prob is None else f' data-p="{piece.prob:.6g}"'
        spans.append(
            f'<span style="background: {colour(piece.prob)}"{prob} '
            f'title="{html.escape(_tooltip(piece))}">{html.escape(piece.text)}</span>'
        )
    legend = " ".join(
        f'<span style="background: {colour(p)}">{p:.2f}</span>' for p in (0, 0.25, 0.5, 0.75, 1)
    )
    return HTML_PAGE.format(
        title=html.escape(title), legend=legend, no_score=NO_SCORE, body="".join(spans)
    )


def _layout(pieces: list[Piece], *, columns: int) -> list[tuple[int, int, str, str]]:
    """(row, column, character, colour) cells of a monospace grid, wrapped at
    `columns`."""
    cells, row, col = [], 0, 0
    for piece in pieces:
        for i, part in enumerate(piece.text.replace("\t", "    ").split("\n")):
            if i:
                row, col = row + 1, 0
            for char in part:
                width = _width(char)
                if col + width > columns:
                    row, col = row + 1, 0
                cells.append((row, col, char, colour(piece.prob)))
                col += width
    return cells


def _width(char: str) -> int:
    """Grid cells a character takes: CJK and other wide characters take two."""
    return 2 if unicodedata.east_asian_width(char) in "WF" else 1


def render_png(pieces: list[Piece], file: BinaryIO, *, title: str, columns: int = 80) -> None:
    """Draw the coloured text as a PNG (matplotlib's Agg canvas, no pyplot state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError:
        raise PocketLMError("PNG output needs matplotlib: pip install 'pocketlm[plot]'") from None
    cells = _layout(pieces, columns=columns)
    rows = max((r for r, *_ in cells), default=0) + 1
    size = 11  # points; a monospace cell is 0.6 em wide and we give lines 1.6 em
    fig = Figure(figsize=((columns + 2) * 0.6 * size / 72, (rows + 3) * 1.6 * size / 72))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-1, columns + 1)
    ax.set_ylim(rows + 0.5, -2.5)
    ax.axis("off")
    title = f"{title} (red: unlikely, green: likely)"
    ax.text(0, -1.5, title, fontsize=size, family="DejaVu Sans Mono", va="center", weight="bold")
    for row, col, char, fill in cells:
        ax.add_patch(Rectangle((col, row), _width(char), 0.9, facecolor=fill, edgecolor="none"))
        if not char.isspace():
            ax.text(col, row + 0.45, char, fontsize=size, family="DejaVu Sans Mono", va="center")
    with warnings.catch_warnings():
        # A character the font lacks is drawn as a box; say nothing more about it.
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.savefig(file, format="png", dpi=120)
