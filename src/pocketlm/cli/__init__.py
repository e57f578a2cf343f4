"""The `pocketlm` command (`entry`); the subcommands are in this package's modules."""


def entry() -> int:
    """The console script: `pocketlm.cli.main.main`, imported inside a guard so that a
    Ctrl-C while Python is still loading the command line exits quietly (130) rather
    than with a traceback. This package imports nothing, so the guard is on at once."""
    import sys

    try:
        from pocketlm.cli.main import main
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return main()
