"""Options and helpers several subcommands share: model loading, threads, devices,
sampling flags, output.

Parsing and printing only; the work is done by `pocketlm.api`.
"""

import argparse
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pocketlm.errors import PocketLMError
from pocketlm.generate import CONTEXT, LOOKAHEAD, MAX_TOKENS


def add_model_options(parser: argparse.ArgumentParser, *, draft: bool = False) -> None:
    """--dtype, --device, --offline, --ctx-size, --quantize, --threads; with `draft` (the
    commands that decode token by token: run, chat) the speculative-decoding options too."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "bf16", "fp16"],
        help="weight dtype (default: a GGUF file's own quantization, kept as stored; else fp32)",
    )
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_threads_option(group)
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
    if draft:
        add_draft_options(group)


def add_draft_options(group: argparse._ActionsContainer) -> None:
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
        help="decode through torch.compile: faster tokens, but it costs time at every start "
        "(a minute or more to compile the first time for a model; seconds to load the kept "
        "result after), so it pays for long answers (hundreds of tokens) and long chats, "
        "not for a short one-shot run (docs/compile.md)",
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


THREADS_ENV = "POCKETLM_THREADS"


def add_threads_option(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help=f"CPU threads (default: ${THREADS_ENV}, else the physical cores that other "
        "programs leave idle, at least 1)",
    )


@dataclass(frozen=True)
class Threads:
    """How many CPU threads a command uses, and why (shown by --stats and bench)."""

    count: int
    why: str

    def __str__(self) -> str:
        return f"{self.count} ({self.why})"


def choose_threads(requested: int | None) -> Threads:
    """--threads, else $POCKETLM_THREADS, else the physical cores not busy right now.

    Why not simply every core (llama.cpp's and Ollama's default): decoding splits each
    token's matrix products across the threads and waits for the slowest, so one thread
    that shares its core with another program stalls the others at every layer. On the
    busy 2-core development machine, 2 threads decoded at 0.6-1.3 tok/s where 1 thread
    kept 15-21 (docs/threads.md has the figures). The count is taken once, at start-up.
    """
    if requested is not None:
        return Threads(_at_least_one(requested, "--threads"), "--threads")
    if env := os.environ.get(THREADS_ENV, "").strip():
        try:
            count = int(env)
        except ValueError:
            raise PocketLMError(f"{THREADS_ENV}={env!r} is not a whole number of threads") from None
        return Threads(_at_least_one(count, THREADS_ENV), THREADS_ENV)
    cores, busy = physical_cores(), busy_cpus()
    cpus = _usable_cpus()
    # What other programs keep busy comes off the logical CPUs; we never go past the
    # physical cores (a hyperthread pair shares one core's arithmetic units).
    count = max(1, min(cores, len(cpus) - busy))
    why = f"{cores} cores, {busy} other threads running" if busy else f"{cores} idle cores"
    return Threads(count, why)


def _at_least_one(count: int, source: str) -> int:
    if count < 1:
        raise PocketLMError(f"{source} must be at least 1 (got {count})")
    return count


def _usable_cpus() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (hyperthread siblings once)."""
    cores = set()
    for cpu in _usable_cpus():
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(topology.read_text().strip())
        except OSError:
            cores.add(str(cpu))  # no sysfs (not Linux): count each CPU as a core
    return max(1, len(cores))


def busy_cpus(samples: int = 5, interval: float = 0.002) -> int:
    """CPUs that other programs keep busy now: the kernel's count of runnable threads
    (`procs_running` in /proc/stat, which includes this one), the least of a few samples
    so that a program that only ran for an instant does not count. 0 where unknown.

    The 1-minute load average would lag a minute behind a job that just started or ended.
    """
    least = None
    for i in range(samples):
        try:
            with open("/proc/stat", encoding="ascii") as stat:
                running = next(
                    int(line.split()[1]) for line in stat if line.startswith("procs_running")
                )
        except (OSError, StopIteration, ValueError):
            return 0
        least = running if least is None else min(least, running)
        if i < samples - 1:
            time.sleep(interval)
    return max(0, (least or 1) - 1)


def use_threads(args: argparse.Namespace) -> Threads:
    """Set torch's thread count from the options (before any work); the choice. Chosen
    once per command: a model loaded later (chat's /load) keeps it, as this process's
    own threads, still spinning after an answer, would otherwise count as busy."""
    import torch

    threads = getattr(args, "threads_used", None) or choose_threads(getattr(args, "threads", None))
    torch.set_num_threads(threads.count)
    args.threads_used = threads
    return threads


def check_device(device: str | None) -> None:
    """Refuse a device this torch cannot use in one line, before loading anything."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise PocketLMError(f"unknown device {device!r}; use cpu or cuda (e.g. cuda:0)") from None
    if kind == "cpu":
        return
    if kind != "cuda":
        raise PocketLMError(f"device {device!r} is not supported; use cpu or cuda")
    if not torch.cuda.is_available():
        why = "has no CUDA" if torch.version.cuda is None else "sees no CUDA GPU"
        raise PocketLMError(f"--device {device}: this PyTorch build {why}; use --device cpu")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise PocketLMError(
            f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (0-based)"
        )


_IMPORTED = time.perf_counter()  # process_age's fallback where there is no /proc


def process_age() -> float:
    """Seconds since this process started (the interpreter's start, where /proc says;
    else since pocketlm's command line was imported)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            # field 22, after the parenthesised command name that may hold spaces
            started_ticks = int(stat.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime", encoding="ascii") as uptime:
            now = float(uptime.read().split()[0])
        return now - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def load_model(name: str | None, args: argparse.Namespace):  # -> pocketlm.LM
    """Load the model the options describe, then take the steps they ask for: a draft
    for speculative decoding (--draft, --draft-quantize, --lookahead), compilation.
    Sets the threads first; the time it took is `args.load_seconds`."""
    # torch: imported only once a command really loads a model
    from pocketlm.api import load
    from pocketlm.generate.speculative import check_lookahead

    started = time.perf_counter()
    draft, draft_quantize = getattr(args, "draft", None), getattr(args, "draft_quantize", None)
    if draft_quantize is not None and draft is None:
        raise PocketLMError("--draft-quantize needs a draft model: name one with --draft MODEL")
    lookahead = getattr(args, "lookahead", LOOKAHEAD)
    check_lookahead(lookahead)  # before loading two models, not after
    check_device(args.device)
    use_threads(args)
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
    args.load_seconds = time.perf_counter() - started
    return lm


def startup_line(args: argparse.Namespace, *, first_token_at: float | None) -> str:
    """What --stats says about start-up: threads, load time (both recorded on `args` by
    `load_model`), and the process's age when the first token came (`process_age()`)."""
    first = process_age() if first_token_at is None else first_token_at
    return (
        f"threads: {args.threads_used}  load: {args.load_seconds:.2f} s  "
        f"start to first token: {first:.2f} s"
    )


def colour_output(stream) -> bool:  # noqa: ANN001 - any text stream
    """Whether to write colour codes to `stream`: a terminal, unless NO_COLOR is set
    (https://no-color.org); never into a pipe or a file."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR")


def note_no_colour() -> None:
    print(
        "note: --show-probs colours the text on a terminal only; for a file, "
        "`pocketlm probs` writes an HTML page",
        file=sys.stderr,
    )


class StderrHandler(logging.StreamHandler):
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
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logging.addLevelName(logging.WARNING, "warning")
