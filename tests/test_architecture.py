"""The rooms of DESIGN.md and their one-way arrows, checked on the source.

    models <- kernels <- {weights, generate} <- train <- api <- serve <- cli
    models <- features <- api;    generate <- prompting <- api
    errors, paths, sampling and tokenizer: leaves that the rooms above them use

Every file under src/pocketlm belongs to a room; each room lists the rooms it may import
(imports inside functions and under TYPE_CHECKING count too); nothing imports cli; the
module graph has no cycle; no module is a god file and no function a god function.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "pocketlm"

# room -> the pocketlm rooms it may import, built up the arrows: each room may use what
# the rooms it sits on may use
ALLOWED: dict[str, set[str]] = {"errors": set(), "paths": set()}
ALLOWED["sampling"] = ALLOWED["tokenizer"] = ALLOWED["models"] = {"errors"}
ALLOWED["kernels"] = {"errors", "models"}
ALLOWED["features"] = {"errors", "models"}
ALLOWED["weights"] = ALLOWED["kernels"] | {"kernels", "paths", "tokenizer"}
ALLOWED["generate"] = ALLOWED["kernels"] | {"kernels", "sampling", "tokenizer"}
ALLOWED["train"] = ALLOWED["weights"] | ALLOWED["generate"] | {"weights", "generate"}
ALLOWED["prompting"] = {"errors", "tokenizer", "sampling", "generate"}
ALLOWED["api"] = ALLOWED["train"] | {"train", "features", "prompting"}
ALLOWED["serve"] = ALLOWED["api"] | {"api"}
ROOMS = {*ALLOWED, "cli"}
ALLOWED["cli"] = ROOMS  # the top: it may import every room, and nothing imports it
ALLOWED["__init__"] = {"api"}  # `pocketlm.load` and `pocketlm.LM`, imported on first use
# `python -m pocketlm`: the command line run as a script, the one module above cli
ALLOWED["__main__"] = {"cli"}
# What lives at the package root besides the rooms.
ROOT_FILES = {"__init__.py", "__main__.py", "data"}

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60

FILES = sorted(SRC.rglob("*.py"))


def _room(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def _module(path: Path) -> str:
    parts = ("pocketlm", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path) -> set[str]:
    """Every pocketlm module `path` imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from pocketlm.x import y` may import the module pocketlm.x.y
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    # The package itself (`from pocketlm import x`) is not a dependency: it always runs.
    return {name for name in found if name.startswith("pocketlm.")}


def _imported_rooms(path: Path) -> set[str]:
    return {n.split(".")[1] for n in _imported_modules(path) if n.count(".") >= 1} & (
        ROOMS | {p.removesuffix(".py") for p in (x.name for x in SRC.iterdir())}
    )


def test_every_file_is_in_a_room():
    stray = [p.name for p in SRC.iterdir() if p.name not in ROOT_FILES and
             p.name.removesuffix(".py") not in ROOMS and p.name != "__pycache__"]  # fmt: skip
    assert not stray, f"{stray} belong to no room of DESIGN.md: move them into one"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_follow_the_arrows(path):
    room = _room(path)
    bad = _imported_rooms(path) - ALLOWED[room] - {room}
    assert not bad, f"{path.relative_to(SRC)} ({room}) imports {sorted(bad)}"


def test_no_import_cycle():
    modules = {_module(p): p for p in FILES}
    graph = {
        name: {m for m in _imported_modules(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    # a package's __init__ is imported with any of its modules: not an edge of its own
    done, stack = set(), []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in stack:
            cycle = stack[stack.index(name) :] + [name]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        stack.append(name)
        for target in sorted(graph[name]):
            visit(target)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_god_files_or_functions(path):
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES, (
        f"{path.name} is over {MAX_MODULE_LINES} lines"
    )
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, (
                f"{path.relative_to(SRC)}:{node.lineno} {node.name} is {length} lines"
            )


def test_the_checks_see_imports():
    # oracles that are not empty
    assert "models" in _imported_rooms(SRC / "generate" / "sequence.py")
    assert "pocketlm.models.cache" in _imported_modules(SRC / "models" / "layers.py")
