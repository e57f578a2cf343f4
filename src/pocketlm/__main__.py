"""`python -m pocketlm ...`: the `pocketlm` command, for when its script is not on PATH."""

import sys

from pocketlm.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
