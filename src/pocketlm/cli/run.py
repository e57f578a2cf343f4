"""`pocketlm run [MODEL] [PROMPT]`: stream the model's answer to PROMPT (or to stdin).

What PROMPT means follows the model, as `ollama run` does: an instruct model (one with a
chat template) answers it as one chat turn; a base model continues it. `--raw` continues
the text as written with any model, and few-shot prompts (`--examples`) are always raw.

With one argument, it is a model when it names one (a path, a stored or known name, an
org/repo id) and otherwise the prompt for the default model. Printing only.
"""

import argparse
import sys

from pocketlm.cli import common
from pocketlm.cli.structured import add_structured_options, structured_options
from pocketlm.errors import PocketLMError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="generate text from a prompt (streams as it goes)",
        description="Continue PROMPT with MODEL (default: the embedded SmolLM2-135M). "
        "The prompt may also come from stdin.",
    )
    parser.add_argument(
        "words", nargs="*", metavar="[MODEL] [PROMPT]", help="model name or path, then the prompt"
    )
    parser.add_argument("-m", "--model", default=None, help="model name, folder or .gguf file")
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="PATH",
        help="a LoRA adapter folder (from `finetune --lora --adapter-only`) to apply",
    )
    parser.add_argument(
        "--stats",
        action="store_true",
        help="print tokens, tokens/s, time to first token, threads, load time and the "
        "time from start to the first token",
    )
    parser.add_argument(
        "--no-truncate",
        action="store_true",
        help="refuse a prompt longer than the context window instead of cutting it",
    )
    parser.add_argument(
        "--examples",
        default=None,
        metavar="FILE",
        help="few-shot: answer PROMPT in the pattern of the .jsonl/.yaml examples",
    )
    parser.add_argument(
        "--template",
        default=None,
        metavar="TEXT",
        help="few-shot template with {input} and {output} (default 'Q: {input}\\nA: {output}')",
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="continue the prompt as written, even with an instruct model (which otherwise "
        "answers it as a chat turn)",
    )
    parser.add_argument(
        "--system", default=None, metavar="TEXT", help="system prompt of an instruct model's turn"
    )
    parser.add_argument(
        "--show-probs", action="store_true", help="colour each token by its probability"
    )
    common.add_model_options(parser, draft=True)
    common.add_compile_option(parser)
    common.add_sampling_options(parser)
    add_structured_options(parser)
    parser.set_defaults(handler=main)


def split_model_and_prompt(words: list[str], model: str | None) -> tuple[str | None, str | None]:
    """(model, prompt) from the positional words."""
    from pocketlm.weights.sources import looks_like_model

    if model is not None or not words:
        return model, " ".join(words) or None
    if len(words) == 1:
        return (words[0], None) if looks_like_model(words[0]) else (None, words[0])
    return words[0], " ".join(words[1:])


def main(args: argparse.Namespace) -> int:
    common.setup_logging()
    model_name, prompt = split_model_and_prompt(args.words, args.model)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt is None:
        from pocketlm.cli.interactive import run_interactive

        return run_interactive(model_name, args, mode="completion" if args.raw else None)
    if not prompt.strip():
        raise PocketLMError("the prompt is empty: give some text to continue")
    from pocketlm.cli.interactive import few_shot_from_args

    shots = few_shot_from_args(args)  # None without --examples; a bad file fails before loading
    structured = structured_options(args)  # likewise a bad schema or grammar
    if args.system is not None and (args.raw or shots):
        raise PocketLMError("--system is for a chat turn: drop it, or drop --raw / --examples")
    lm = common.load_model(model_name, args)
    return answer(lm, prompt, args, shots=shots, structured=structured)


def answer(  # noqa: ANN001
    lm, prompt: str, args: argparse.Namespace, *, shots=None, structured: dict | None = None
) -> int:
    """Stream the answer to `prompt` from the loaded `lm` to stdout, as the options say."""
    from pocketlm.cli.interactive import paint

    options = dict(
        max_tokens=args.max_tokens,
        stop=[common.unescape(s) for s in args.stop],
        logprobs=0 if args.show_probs else None,  # colouring needs each token's
        **common.sampling_kwargs(args),
        **(structured or {}),
    )
    stream = open_stream(lm, prompt, args, shots=shots, options=options)
    stats, first_token_at = None, None
    colour = args.show_probs and common.colour_output(sys.stdout)
    if args.show_probs and not colour:
        common.note_no_colour()
    for chunk in stream:
        if first_token_at is None and chunk.token is not None:
            first_token_at = common.process_age()
        sys.stdout.write(paint(chunk) if colour else chunk.text)
        sys.stdout.flush()
        stats = chunk.stats
    sys.stdout.write("\n")
    if args.stats and stats is not None:
        print_stats(stats)
        print(common.startup_line(args, first_token_at=first_token_at), file=sys.stderr)
    return 0


def open_stream(lm, prompt: str, args: argparse.Namespace, *, shots, options: dict):
    """The chunks of the answer: a chat turn for an instruct model (unless --raw), else
    the prompt continued as written (few-shot prompts always are)."""
    if shots is not None:
        return shots.stream(lm, prompt, truncate=not args.no_truncate, **options)
    if args.raw or lm.tokenizer.chat_template is None:
        if args.system is not None:
            raise PocketLMError(
                f"{lm.name} has no chat template, so there is no system prompt: drop --system"
            )
        return lm.stream(prompt, truncate=not args.no_truncate, **options)
    from pocketlm.prompting.chat import Conversation

    # A chat turn is never cut from the left: a truncated template would garble the turn.
    return Conversation(lm, system=args.system).send(prompt, **options)


def print_stats(stats) -> None:
    drafted = (
        f"  draft accepted: {stats.draft_accepted}/{stats.draft_proposed}"
        if stats.draft_proposed
        else ""
    )
    print(
        f"prompt tokens: {stats.prompt_tokens}  new tokens: {stats.new_tokens}  "
        f"time to first token: {stats.time_to_first_token * 1000:.0f} ms  "
        f"speed: {stats.tokens_per_second:.1f} tokens/s{drafted}",
        file=sys.stderr,
    )
