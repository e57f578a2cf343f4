"""The one-way arrows of DESIGN.md, checked on the source: models <- weights <-
{generate, features, train} <- serve <- cli; nothing imports cli; models know nothing of
files, tokenizers, sampling or HTTP."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "pocketlm"

# room -> pocketlm rooms it must never import
FORBIDDEN = {
    "models": {
        "weights",
        "tokenizer",
        "sampling",
        "generate",
        "features",
        "train",
        "serve",
        "cli",
        "api",
        "chat",
    },
    "weights": {"generate", "features", "train", "serve", "cli", "api", "chat", "sampling"},
    "sampling": {"models", "weights", "tokenizer", "generate", "serve", "cli", "api"},
    "tokenizer": {"models", "weights", "sampling", "generate", "serve", "cli", "api"},
    "generate": {"serve", "cli", "train"},
    "features": {"serve", "cli", "train"},
    "train": {"serve", "cli"},
    "serve": {"cli"},
}


def _room(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def _imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        rooms |= {n.split(".")[1] for n in names if n.startswith("pocketlm.") and n.count(".") >= 1}
    return rooms


FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_follow_the_arrows(path):
    room = _room(path)
    bad = _imported_rooms(path) & FORBIDDEN.get(room, set())
    if room != "cli":
        bad |= _imported_rooms(path) & {"cli"}
    assert not bad, f"{path.relative_to(SRC)} ({room}) imports {sorted(bad)}"


def test_the_check_sees_imports():
    assert "models" in _imported_rooms(SRC / "generate" / "sequence.py")  # an oracle that is not empty
