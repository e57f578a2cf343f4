"""The training loop: AdamW, warmup + cosine, accumulation, clipping, checkpoints, resume.

One optimizer step takes `batch_size x grad_accum x world_size` blocks from a single
endless stream of block indices: the concatenation of seeded per-epoch permutations. So
the blocks of step s depend on s and the seed alone, and a resumed run needs only the
step number to go on with the same data order. The loss of a step is the mean over all
its label tokens (across micro-batches and processes), so one process with a global
batch of 2B and two processes with B each compute the same gradient.

Checkpoints (see `checkpoint.py`) hold the trainable tensors, the optimizer, the
scheduler, every process's RNG state and the step; `resume` restores them all, so 10
steps + resume + 10 steps give the weights of 20 steps. Ctrl-C (SIGINT) or SIGTERM asks
the loop to stop at the next step boundary and save, never mid-update.

Knows nothing of the command line or of files other than its run folder. (nanoGPT
`train.py`, HF `Trainer`'s schedule and accumulation semantics.)
"""

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.errors import PocketLMError
from pocketlm.generate.params import GenerationParams
from pocketlm.generate.sequence import Sequence
from pocketlm.generate.stream import generate_tokens
from pocketlm.sampling import SamplingParams
from pocketlm.tokenizer import Tokenizer
from pocketlm.train import checkpoint, distributed
from pocketlm.train.data import IGNORE, Dataset
from pocketlm.train.distributed import World
from pocketlm.train.metrics import MetricsLog, plot_losses

Event = dict[str, Any]


@dataclass
class TrainConfig:
    steps: int | None = None  # optimizer steps; None: from epochs
    epochs: float | None = None  # passes over the training blocks (default 1)
    max_time: float | None = None  # seconds of training before saving and stopping
    batch_size: int = 8  # blocks per micro-batch, per process
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int | None = None  # steps; None: 5% of the run, at most 100
    min_lr_ratio: float = 0.1  # the cosine ends at lr x this
    clip: float = 1.0  # max gradient norm; 0 turns clipping off
    eval_every: int = 50
    save_every: int = 100
    sample_every: int = 0
    sample_prompt: str = ""
    sample_tokens: int = 32
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on GPUs that have it), fp32, bf16
    activation_checkpointing: bool = False
    fsdp: bool = False

    def validate(self) -> None:
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum}
        for name, value in positive.items():
            if value < 1:
                raise PocketLMError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
        if self.steps is not None and self.steps < 1:
            raise PocketLMError(f"--steps must be at least 1 (got {self.steps})")
        if self.epochs is not None and self.epochs <= 0:
            raise PocketLMError(f"--epochs must be positive (got {self.epochs})")
        if self.max_time is not None and self.max_time <= 0:
            raise PocketLMError(f"--max-time must be positive (got {self.max_time})")
        if not self.lr > 0:
            raise PocketLMError(f"--lr must be positive (got {self.lr})")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise PocketLMError(f"--precision must be auto, fp32 or bf16 (got {self.precision})")


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (GPT-2's and Falcon's `transformer.h`, Llama's `model.layers`,
    GPT-NeoX's `gpt_neox.layers`)."""
    if hasattr(model, "transformer"):
        return list(model.transformer.h)
    return list(model.gpt_neox.layers if hasattr(model, "gpt_neox") else model.model.layers)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them."""
    from torch.utils.checkpoint import checkpoint as recompute

    for block in model_blocks(model):
        forward = block.forward

        def checkpointed(*args: Any, _forward: Callable = forward) -> torch.Tensor:
            return recompute(_forward, *args, use_reentrant=False)

        block.forward = checkpointed  # an instance attribute: parameter names stay the same


class Trainer:
    """Trains `model` (its parameters with requires_grad) on `dataset`, saving in `run_dir`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer: Tokenizer,
        dataset: Dataset,
        config: TrainConfig,
        run_dir: Path,
        world: World | None = None,
        on_event: Callable[[Event], None] | None = None,
        extra_state: dict[str, Any] | None = None,
    ) -> None:
        config.validate()
        self.model, self.tokenizer, self.dataset, self.config = model, tokenizer, dataset, config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.world = world or World()
        self.on_event = on_event or (lambda event: None)
        self.extra_state = extra_state or {}  # saved in checkpoints (e.g. the LoRA settings)
        self.device = next(model.parameters()).device
        self.metrics = MetricsLog(self.run_dir)
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self.val_loss: float | None = None  # the latest validation loss
        self.global_batch = config.batch_size * config.grad_accum * self.world.size
        self.total_steps = config.steps or max(
            1, math.ceil((config.epochs or 1.0) * len(dataset.train) / self.global_batch)
        )
        self.warmup = (
            config.warmup if config.warmup is not None else min(100, self.total_steps // 20)
        )
        self.bf16 = _use_bf16(config.precision, self.device)
        self._valid = (dataset.train.labels[:, 1:] != IGNORE).sum(dim=1)  # loss tokens per block
        self._perms: dict[int, torch.Tensor] = {}
        self._stop_requested = False

        model.train()
        if config.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        for p in model.parameters():
            # GPT-2's Conv1D weights arrive as transposed views; FSDP needs contiguous
            # parameters, and DDP's gradient buckets are laid out like them.
            p.data = p.data.contiguous()
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.wrapped = distributed.wrap(
            model, self.world, fsdp=config.fsdp, blocks=model_blocks(model)
        )
        self.params = [p for p in model.parameters() if p.requires_grad]  # FSDP swaps them
        self.optimizer = _make_optimizer(
            model, lr=config.lr, weight_decay=config.weight_decay, fused=not config.fsdp
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        torch.manual_seed(config.seed + self.world.rank)  # dropout (LoRA) differs per process

    # -- schedule and data order --

    def _lr_factor(self, step: int) -> float:
        """Linear warmup, then cosine from 1 down to `min_lr_ratio` at the last step."""
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total_steps - self.warmup))
        floor = self.config.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def _indices(self, start: int, count: int) -> torch.Tensor:
        """Block indices start .. start+count-1 of the endless shuffled stream."""
        n = len(self.dataset.train)
        positions = torch.arange(start, start + count)
        out = torch.empty(count, dtype=torch.long)
        for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
            if epoch not in self._perms:
                generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
                self._perms = {epoch: torch.randperm(n, generator=generator)}  # keep one
            here = positions // n == epoch
            out[here] = self._perms[epoch][positions[here] % n]
        return out

    def _micro_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, w = self.config.batch_size, self.world.size
        start = step * self.global_batch + (micro * w + self.world.rank) * b
        index = self._indices(start, b)
        train = self.dataset.train
        return train.inputs[index].to(self.device), train.labels[index].to(self.device)

    # -- the loop --

    def train(self, *, until: int | None = None) -> str:
        """Train to the last step (or `until`, or the time limit, or a stop request);
        returns why it stopped: "done", "until", "time" or "interrupted"."""
        end = min(self.total_steps, until) if until is not None else self.total_steps
        started, start_step = time.perf_counter(), self.step
        reason = "done" if end == self.total_steps else "until"
        with self._stop_on_signals():
            while self.step < end:
                t0 = time.perf_counter()
                loss, tokens = self._train_step()
                seconds = time.perf_counter() - t0
                self.elapsed += seconds
                self._after_step(loss, tokens=tokens, seconds=seconds)
                limit = self.config.max_time
                out_of_time = limit is not None and time.perf_counter() - started >= limit
                # Every process must stop after the same step (they meet in collectives):
                # decide together.
                interrupted, out_of_time = distributed.any_of(
                    [self._stop_requested, out_of_time], self.world, device=self.device
                )
                if interrupted:
                    reason = "interrupted"
                    break
                if out_of_time and self.step < end:
                    reason = "time"
                    break
        if self.step > start_step or reason != "done":
            self.save_checkpoint()
        return reason

    def _train_step(self) -> tuple[float, int]:
        """One optimizer step over grad_accum micro-batches; (mean loss, tokens)."""
        cfg, world = self.config, self.world
        first = self.step * self.global_batch
        count = int(self._valid[self._indices(first, self.global_batch)].sum())
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(cfg.grad_accum):
            inputs, labels = self._micro_batch(self.step, micro)
            with self._sync(last=micro == cfg.grad_accum - 1), self._autocast():
                loss_sum = token_loss(self.wrapped, inputs, labels)
            # DDP averages gradients over processes: scale so the result is the mean
            # over the global batch's label tokens.
            (loss_sum * (world.size / max(count, 1))).backward()
            total += loss_sum.detach()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = self.global_batch * self.dataset.train.inputs.shape[1]
        self.tokens_seen += tokens
        return distributed.sum_all(float(total), world, device=self.device) / max(count, 1), tokens

    def _after_step(self, loss: float, *, tokens: int, seconds: float) -> None:
        cfg, step = self.config, self.step
        record = {
            "step": step,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
            "tokens": self.tokens_seen,
            "elapsed": self.elapsed,
        }
        self._record("step", record, total=self.total_steps)
        last = step == self.total_steps
        if (
            self.dataset.val is not None
            and cfg.eval_every > 0
            and (step % cfg.eval_every == 0 or last)
        ):
            self.val_loss = self.evaluate()
            self._record("eval", {"step": step, "val_loss": self.val_loss})
        if cfg.sample_every > 0 and (step % cfg.sample_every == 0 or last):
            self._record("sample", {"step": step, "sample": self.sample()})
        if cfg.save_every > 0 and step % cfg.save_every == 0 and not last:
            self.save_checkpoint()

    def _record(self, kind: str, record: dict[str, Any], **extra: Any) -> None:
        if self.world.is_main:
            self.metrics.write(record)
            self.on_event({"kind": kind, **record, **extra})

    # -- evaluation and samples --

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per label token over the validation blocks."""
        val = self.dataset.val
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(val), self.config.batch_size):
            inputs = val.inputs[start : start + self.config.batch_size].to(self.device)
            labels = val.labels[start : start + self.config.batch_size].to(self.device)
            with self._autocast():
                total += float(token_loss(self.model, inputs, labels))
            count += int((labels[:, 1:] != IGNORE).sum())
        self.model.train()
        return total / max(count, 1)

    def sample(self) -> str:
        """Greedy continuation of the sample prompt (deterministic, uses no RNG)."""
        prompt = (
            self.tokenizer.encode(self.config.sample_prompt) if self.config.sample_prompt else []
        )
        prompt = prompt or [
            self.tokenizer.bos_id
            if self.tokenizer.bos_id is not None
            else min(self.tokenizer.eos_ids)
        ]
        self.model.eval()
        steps = generate_tokens(
            Sequence(self.model),
            prompt,
            GenerationParams(SamplingParams(temperature=0.0), max_tokens=self.config.sample_tokens),
            eos_ids=self.tokenizer.eos_ids,
        )
        ids = [s.token for s in steps if s.token not in self.tokenizer.eos_ids]
        self.model.train()
        return self.config.sample_prompt + self.tokenizer.decode(ids)

    # -- checkpoints --

    def save_checkpoint(self) -> Path | None:
        """Save everything `resume` needs (collective: every process calls it)."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rngs = distributed.gather_objects(rng, self.world)
        model_state, optim_state = self._state_dicts()
        path = None
        if self.world.is_main:
            state = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "elapsed": self.elapsed,
                "model": model_state,
                "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(),
                "rng": rngs,
                "data": self.dataset.train.fingerprint(),
                "world_size": self.world.size,
                "config": asdict(self.config),
                "extra": self.extra_state,
            }
            path = checkpoint.save(self.run_dir, state, step=self.step)
            plot_losses(self.run_dir)
            self.on_event({"kind": "checkpoint", "step": self.step, "path": str(path)})
        distributed.barrier(self.world)
        return path

    @property
    def sharded(self) -> bool:
        return self.config.fsdp and self.world.size > 1

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict on the CPU (collective under FSDP)."""
        if not self.sharded:
            return {n: t.detach().cpu() for n, t in self.model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    def _state_dicts(self) -> tuple[dict, dict]:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_state_dict(self.model, self.optimizer, options=options)
        trainable = {
            n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad
        }
        return trainable, self.optimizer.state_dict()

    def resume(self, folder: Path | None = None) -> int:
        """Continue from the newest checkpoint in the run folder (or `folder`); the step."""
        folder = folder or checkpoint.latest(self.run_dir)
        if folder is None:
            raise PocketLMError(
                f"no checkpoint to resume from in {checkpoint.checkpoints_dir(self.run_dir)}"
            )
        state = checkpoint.load(folder)
        if state["data"] != self.dataset.train.fingerprint():
            raise PocketLMError(
                "the training data (or --block-size / --val-fraction) changed since the "
                "checkpoint; resume with the same data and settings"
            )
        self._load_state_dicts(state["model"], state["optimizer"], source=folder)
        self.scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        if len(rngs) == self.world.size:  # the same world: each process gets its own RNG back
            torch.set_rng_state(rngs[self.world.rank]["cpu"])
            if "cuda" in rngs[self.world.rank] and self.device.type == "cuda":
                torch.cuda.set_rng_state(rngs[self.world.rank]["cuda"], self.device)
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.elapsed = float(state["elapsed"])
        if self.world.is_main:
            self.metrics.truncate(self.step)
        return self.step

    def _load_state_dicts(self, model_state: dict, optim_state: dict, *, source: Path) -> None:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            options = StateDictOptions(full_state_dict=True)
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=model_state,
                optim_state_dict=optim_state,
                options=options,
            )
            return
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if set(params) != set(model_state):
            odd = sorted(set(params) ^ set(model_state))[0]
            raise PocketLMError(
                f"checkpoint {source} does not fit this model and settings (tensor {odd!r})"
            )
        with torch.no_grad():
            for name, tensor in model_state.items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(optim_state)

    # -- helpers --

    def _sync(self, *, last: bool) -> contextlib.AbstractContextManager:
        """DDP: all-reduce gradients on the last micro-batch of a step only."""
        if self.world.size > 1 and not last and hasattr(self.wrapped, "no_sync"):
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    @contextlib.contextmanager
    def _stop_on_signals(self):  # noqa: ANN202 - a context manager
        """SIGINT / SIGTERM: finish the current step, save, stop. A second one stops now."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: object) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def token_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the label tokens that are not -100."""
    B, T = inputs.shape
    positions = torch.arange(T, device=inputs.device).expand(B, T)  # (B, T)
    logits = model(inputs, positions)  # (B, T, V)
    # Shift the labels, not the logits: slicing (B, T, V) would copy the largest tensor
    # of the step. The last position has no next token: its label is -100.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def _make_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, fused: bool
) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on biases or norm gains), as GPT-2 did.
    The fused kernel (one pass over each tensor) on CPUs and GPUs; FSDP's sharded
    parameters take the default."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None
    )


def _use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return False
    supported = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if precision == "bf16":
        if not supported:
            raise PocketLMError(f"bf16 is not supported on {device}; use --precision fp32")
        return True
    return device.type == "cuda" and supported  # auto: on GPUs; CPUs keep fp32 exactness
