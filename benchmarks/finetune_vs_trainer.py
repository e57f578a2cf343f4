"""Training speed: pocketlm's trainer against `transformers`' Trainer, side by side.

Same checkpoint (a random GPT-2 in HF layout with the real 50,257-token vocabulary), same
packed blocks (pocketlm's data pipeline, fed to both), same batch, same number of steps,
fp32 on the CPU, AdamW with warmup + cosine and gradient clipping in both; no evaluation,
no checkpoints. Each side runs `--rounds` times, alternating, and the best time of each is
compared (a shared machine is noisy). Prints training tokens/s for both and the ratio
(target: pocketlm >= 1.0x).

    python benchmarks/finetune_vs_trainer.py                 # GPT-2 with 4 layers, 256 wide
    python benchmarks/finetune_vs_trainer.py --n-embd 768 --n-layer 12 --steps 10   # GPT-2 small

Knows nothing of pocketlm's CLI. Needs `accelerate` (Trainer's requirement).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def corpus(folder: Path) -> Path:
    """Real English prose to train on: the project's own documentation."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(ROOT.glob("*.md")) if p.is_file()]
    texts += (
        [Path("/work/shared/DESIGN.md").read_text()]
        if Path("/work/shared/DESIGN.md").is_file()
        else []
    )
    file = folder / "corpus.txt"
    file.write_text("\n\n".join(texts) * 4)
    return file


def run_pocketlm(model_dir: Path, blocks, *, args: argparse.Namespace, run_dir: Path) -> float:
    """Seconds for `args.steps` optimizer steps with pocketlm's Trainer."""
    from pocketlm.train.data import Dataset
    from pocketlm.train.trainer import TrainConfig, Trainer
    from pocketlm.weights import loader

    loaded = loader.load(model_dir)
    model = loaded.model.requires_grad_(True)
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=1e-4, warmup=2, eval_every=0,
        save_every=0, precision="fp32",
    )  # fmt: skip
    trainer = Trainer(
        model, tokenizer=loaded.tokenizer, dataset=Dataset(blocks, None, 0), config=config,
        run_dir=run_dir,
    )  # fmt: skip
    trainer.save_checkpoint = lambda: None  # measure training, not the final save
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def run_transformers(model_dir: Path, blocks, *, args: argparse.Namespace, out_dir: Path) -> float:
    """Seconds for the same steps with transformers.Trainer (its own loop, loss and AdamW)."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": blocks.inputs[i], "labels": blocks.labels[i]}

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    training = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=1e-4, warmup_steps=2, lr_scheduler_type="cosine", max_grad_norm=1.0,
        weight_decay=0.0, save_strategy="no", eval_strategy="no", logging_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=training, train_dataset=Blocks())
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from checkpoints import make_gpt2
    from pocketlm.tokenizer import Tokenizer
    from pocketlm.train.data import load_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_gpt2(
            tmp / "model", n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_embd // 64,
            n_positions=max(1024, args.block_size),
        )  # fmt: skip
        dataset = load_dataset(
            corpus(tmp), Tokenizer.from_dir(model_dir), block_size=args.block_size,
            context_length=max(1024, args.block_size), val_fraction=0,
        )  # fmt: skip
        blocks = dataset.train
        tokens = args.steps * args.batch_size * args.block_size
        ours, theirs = [], []
        for round_ in range(args.rounds):
            ours.append(run_pocketlm(model_dir, blocks, args=args, run_dir=tmp / f"ours{round_}"))
            theirs.append(
                run_transformers(model_dir, blocks, args=args, out_dir=tmp / f"hf{round_}")
            )
        a, b = tokens / min(ours), tokens / min(theirs)
        print(
            f"GPT-2 n_embd={args.n_embd} n_layer={args.n_layer}, batch {args.batch_size} x "
            f"{args.block_size} tokens, {args.steps} steps, fp32, {torch.get_num_threads()} threads"
        )
        print(
            f"pocketlm Trainer:     {a:8.0f} training tokens/s  (runs: {', '.join(f'{t:.2f}s' for t in ours)})"
        )
        print(
            f"transformers Trainer: {b:8.0f} training tokens/s  (runs: {', '.join(f'{t:.2f}s' for t in theirs)})"
        )
        print(f"ratio: {a / b:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
