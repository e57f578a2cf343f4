"""`pocketlm finetune MODEL DATA --out NAME`: train on your own text, then `pocketlm run NAME`.

Parsing and printing only (a tqdm bar with step, loss, validation loss, tokens/s and
ETA; samples and checkpoints as lines above it); the work is `pocketlm.train.finetune`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pocketlm.cli import common
from pocketlm.errors import PocketLMError

if TYPE_CHECKING:
    from pocketlm.train.finetune import FinetuneJob


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on your own text (full or LoRA)",
        description="Fine-tune MODEL on DATA (a text file, a folder of text files, or JSONL with "
        '{"text": ...} or {"prompt": ..., "completion": ...} lines) and save the result '
        "in the model store as NAME. Runs under torchrun for several GPUs or machines.",
    )
    parser.add_argument("model", metavar="MODEL", help="base model: name, folder or .gguf file")
    parser.add_argument("data", metavar="DATA", type=Path, help="text file, folder or .jsonl")
    parser.add_argument(
        "--out",
        required=True,
        metavar="NAME",
        help="model store name for the result (with --adapter-only: a folder)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run of --out from its last checkpoint, with its saved settings (only --max-time may change)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model NAME")
    parser.add_argument(
        "--export-dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="dtype of the exported weights (default fp32; bf16 halves the folder)",
    )
    _add_lora_options(parser)
    _add_length_options(parser)
    _add_training_options(parser)
    group = parser.add_argument_group("model")
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    common.add_threads_option(group)
    group.add_argument("--offline", action="store_true", help="never touch the network")
    parser.set_defaults(handler=main)


def _add_lora_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRA")
    group.add_argument(
        "--lora", action="store_true", help="train low-rank adapters instead of all weights"
    )
    group.add_argument("--lora-rank", type=int, default=8)
    group.add_argument("--lora-alpha", type=float, default=16.0)
    group.add_argument("--lora-dropout", type=float, default=0.0)
    group.add_argument(
        "--lora-targets",
        default=None,
        metavar="NAMES",
        help="comma-separated linear layers (default: c_attn for GPT-2, q/k/v/o_proj for Llama)",
    )
    out = group.add_mutually_exclusive_group()
    out.add_argument(
        "--merge", action="store_true", help="merge the adapter into the weights (the default)"
    )
    out.add_argument(
        "--adapter-only",
        action="store_true",
        help="save only the adapter, in the folder --out (use it with `run --adapter`)",
    )


def _add_length_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("how long")
    group.add_argument("--steps", "--max-steps", type=int, default=None, help="optimizer steps")
    group.add_argument(
        "--epochs", type=float, default=None, help="passes over the data (default 1)"
    )
    group.add_argument(
        "--max-time",
        default=None,
        metavar="TIME",
        help="stop, with a checkpoint, after TIME (e.g. 90, 30m, 2h); resume later",
    )


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--batch-size", type=int, default=8, help="blocks per micro-batch, per process"
    )
    group.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    group.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default 1e-4; LoRA 1e-3)"
    )
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument(
        "--warmup", type=int, default=None, help="warmup steps (default 5%%, at most 100)"
    )
    group.add_argument("--clip", type=float, default=1.0, help="gradient norm limit (0: off)")
    group.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="tokens per block (default: context, at most 512)",
    )
    group.add_argument(
        "--val-fraction", type=float, default=0.1, help="blocks held out for validation"
    )
    group.add_argument("--eval-every", type=int, default=50, help="validation loss every N steps")
    group.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    group.add_argument(
        "--sample-every", type=int, default=0, help="print a sample every N steps (0: off)"
    )
    group.add_argument("--sample-prompt", default="", help="the fixed prompt of the samples")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 autocast on GPUs that support it, fp32 on CPUs",
    )
    group.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass (less memory, ~30%% slower)",
    )
    group.add_argument(
        "--fsdp", action="store_true", help="under torchrun: shard the model (FSDP) instead of DDP"
    )
    group.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="where checkpoints, metrics.jsonl and loss.png go (default: <home>/runs/NAME)",
    )


def parse_duration(text: str | None) -> float | None:
    """Seconds from "90", "90s", "30m", "2h" or "1.5h"."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise PocketLMError(f"--max-time {text!r} is not a duration like 90, 30m or 2h")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def build_job(args: argparse.Namespace) -> FinetuneJob:
    # pocketlm.train loads torch: imported here, not at the top, so the CLI starts at once
    import torch

    from pocketlm.train.finetune import FinetuneJob
    from pocketlm.train.lora import LoRAConfig
    from pocketlm.train.trainer import TrainConfig

    lora = None
    if args.lora:
        targets = [t.strip() for t in (args.lora_targets or "").split(",") if t.strip()]
        lora = LoRAConfig(
            rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets
        )
    elif args.adapter_only or args.lora_targets:
        raise PocketLMError("--adapter-only and --lora-targets need --lora")
    train = TrainConfig(
        steps=args.steps,
        epochs=args.epochs,
        max_time=parse_duration(args.max_time),
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr if args.lr is not None else (1e-3 if args.lora else 1e-4),
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        clip=args.clip,
        eval_every=args.eval_every,
        save_every=args.save_every,
        sample_every=args.sample_every,
        sample_prompt=args.sample_prompt,
        seed=args.seed,
        precision=args.precision,
        activation_checkpointing=args.activation_checkpointing,
        fsdp=args.fsdp,
    )
    return FinetuneJob(
        model=args.model,
        data=args.data,
        out=args.out,
        train=train,
        lora=lora,
        adapter_only=args.adapter_only,
        block_size=args.block_size,
        val_fraction=args.val_fraction,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        offline=args.offline,
        run_dir=args.run_dir,
        export_dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
            args.export_dtype
        ],
    )


class ProgressBar:
    """The live bar; samples and checkpoints are printed above it."""

    def __init__(self, threads: object = None) -> None:
        self.bar = None
        self.val_loss: float | None = None
        self.threads = threads  # shown once training starts (common.Threads)

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        kind = event["kind"]
        if kind == "step":
            if self.bar is None:
                if self.threads is not None:
                    self._write(f"threads: {self.threads}")
                self.bar = tqdm(
                    total=event["total"],
                    initial=event["step"] - 1,
                    unit="step",
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
            postfix = {"loss": f"{event['loss']:.3f}", "tok/s": f"{event['tokens_per_second']:.0f}"}
            if self.val_loss is not None:
                postfix["val"] = f"{self.val_loss:.3f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        elif kind == "eval":
            self.val_loss = event["val_loss"]
            self._write(f"step {event['step']}: validation loss {event['val_loss']:.4f}")
        elif kind == "sample":
            self._write(f"step {event['step']} sample: {event['sample']!r}")
        elif kind == "checkpoint":
            self._write(f"step {event['step']}: checkpoint saved ({event['path']})")

    def _write(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(args: argparse.Namespace) -> int:
    from pocketlm.train.finetune import finetune  # loads torch: here for start-up time

    common.setup_logging()
    job = build_job(args)
    common.check_device(args.device)
    threads = common.use_threads(args)
    main_process = os.environ.get("RANK", "0") == "0"  # torchrun: one bar, on rank 0
    bar = ProgressBar(threads) if main_process else None
    try:
        result = finetune(job, on_event=bar)
    finally:
        if bar is not None:
            bar.close()
    if not main_process:
        return 0
    if result.reason in ("time", "interrupted"):
        print(
            f"stopped at step {result.step}/{result.total_steps}; the checkpoint is in "
            f"{result.run_dir / 'checkpoints'}. Continue with: pocketlm finetune {args.model} "
            f"{args.data} --out {args.out} --resume",
            file=sys.stderr,
        )
        return 130 if result.reason == "interrupted" else 0
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    if job.adapter_only:
        print(
            f"saved the adapter in {result.output}{val}. Try: pocketlm run {args.model} --adapter {result.output} 'Hello'"
        )
    else:
        print(f"saved '{args.out}' in {result.output}{val}. Try: pocketlm run {args.out} 'Hello'")
    return 0
