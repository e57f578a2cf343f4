"""The command line starts at once: `pocketlm --help`, every `pocketlm CMD --help` and
every argument error finish without importing torch (or numpy, transformers, fastapi),
because only the chosen subcommand's module is imported and the handlers load the engine.
The table of commands in `cli/main.py` is kept equal to what the modules register."""

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pocketlm.cli.main import COMMANDS, build_parser, chosen_command, main
from pocketlm.generate import CONTEXT, LOOKAHEAD, MAX_TOKENS

CLI = Path(__file__).resolve().parents[1] / "src" / "pocketlm" / "cli"
HEAVY = ("torch", "numpy", "transformers", "fastapi", "uvicorn", "pocketlm.features.scores")

# Runs `pocketlm ARGV...` in a fresh interpreter, then reports what it imported.
PROBE = """
import json, sys
from pocketlm.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = [m for m in HEAVY if m in sys.modules]
print(json.dumps({"code": code, "heavy": heavy}))
"""


def probe(*argv: str) -> dict:
    script = f"HEAVY = {HEAVY!r}\n{PROBE}"
    result = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        ([], 2),
        (["--help"], 0),
        (["-h"], 0),
        (["no-such-command"], 2),
        (["--no-such-option"], 2),
        *[([c.name, "--help"], 0) for c in COMMANDS],
        (["run", "--temperature", "abc"], 2),
        (["run", "model", "prompt", "--no-such-option"], 2),
        (["chat", "--max-tokens", "many"], 2),
        (["serve", "--port", "x"], 2),
        (["embed", "model", "text", "--out", "x.npy", "--pool", "max"], 2),
        (["finetune"], 2),
        (["bench", "--new-tokens", "x"], 2),
        (["score", "model", "text", "--quantize", "int3"], 2),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_help_and_argument_errors_never_load_torch(argv, code):
    assert probe(*argv) == {"code": code, "heavy": []}


def test_the_probe_sees_heavy_imports():
    # an oracle that is not empty: a command that does load the engine is reported
    script = f"HEAVY = {HEAVY!r}\nimport pocketlm.features.scores\n{PROBE}"
    result = subprocess.run(
        [sys.executable, "-c", script, "--help"], capture_output=True, text=True, timeout=120
    )
    assert "torch" in json.loads(result.stdout.splitlines()[-1])["heavy"]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_the_table_matches_the_module(command):
    module = importlib.import_module(f"pocketlm.cli.{command.module}")
    subparsers = argparse.ArgumentParser().add_subparsers()
    module.add_parser(subparsers)
    assert list(subparsers.choices) == [command.name]
    (listed,) = subparsers._choices_actions  # where argparse keeps the name and help for --help
    assert (listed.dest, listed.help) == (command.name, command.help)


def test_every_subcommand_module_is_in_the_table():
    modules = {p.stem for p in CLI.glob("*.py") if "\ndef add_parser(" in p.read_text("utf-8")}
    assert modules == {c.module for c in COMMANDS}
    assert len({c.name for c in COMMANDS}) == len(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_the_listing_is_the_same_whichever_command_is_chosen(command):
    assert build_parser(command.name).format_help() == build_parser().format_help()


@pytest.mark.parametrize(
    ("argv", "chosen"),
    [
        ([], None),
        (["--help"], None),
        (["run", "list", "-n", "5"], "run"),
        (["list"], "list"),
        (["-h", "serve"], "serve"),
        (["--", "run"], "run"),
        (["list_models"], None),  # a module name is not a command
        (["nope", "run"], None),
    ],
)
def test_the_chosen_command(argv, chosen):
    assert chosen_command(argv) == chosen


def test_cli_defaults_are_the_engines(capsys):
    args = build_parser("run").parse_args(["run"])
    assert (args.max_tokens, args.lookahead) == (MAX_TOKENS, LOOKAHEAD)
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    assert f"(default {MAX_TOKENS})" in shown
    assert f"(default: {LOOKAHEAD})" in shown
    assert f"at most {CONTEXT})" in shown


def test_embed_offers_the_features_pools():
    from pocketlm.cli import embed
    from pocketlm.features import POOLS

    assert embed.POOLS is POOLS  # one constant, from a module that imports nothing
