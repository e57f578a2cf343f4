"""`finetune(job)`: load a model, read the data, train (full or LoRA), export the result.

The one entry point the CLI and the Python API share. A run keeps its working files in
a run folder (default `<pocketlm home>/runs/NAME`): run.json (the settings, so `--resume`
needs only the name), metrics.jsonl, loss.png and checkpoints/. When training reaches its
last step the model is written to the store as NAME (LoRA merged into the weights), or,
with `adapter_only`, the adapter alone is written to the folder `out`.
Knows nothing of the terminal.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pocketlm import paths
from pocketlm.errors import PocketLMError
from pocketlm.train import checkpoint, distributed, export
from pocketlm.train.data import load_dataset
from pocketlm.train.lora import LoRAConfig, apply_lora, merge_lora, save_adapter
from pocketlm.train.metrics import METRICS, PLOT
from pocketlm.train.trainer import Event, TrainConfig, Trainer

RUN_FILE = "run.json"


@dataclass
class FinetuneJob:
    model: str  # name or path of the base model
    data: Path
    out: str  # store name (or, with adapter_only, a folder for the adapter)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig | None = None
    adapter_only: bool = False
    block_size: int | None = None  # None: the context length, at most 512
    val_fraction: float = 0.1
    resume: bool = False
    overwrite: bool = False
    device: str | None = None
    offline: bool = False
    run_dir: Path | None = None
    # The exported weights' dtype: training runs in fp32, but bf16 halves the folder (and
    # is how most checkpoints on the hub are stored).
    export_dtype: torch.dtype = torch.float32


@dataclass
class FinetuneResult:
    reason: str  # "done", "until", "time" or "interrupted"
    step: int
    total_steps: int
    run_dir: Path
    output: Path | None  # the exported model (or adapter); None unless training finished
    val_loss: float | None


def run_dir_for(job: FinetuneJob) -> Path:
    if job.run_dir is not None:
        return Path(job.run_dir)
    return paths.runs_dir() / Path(job.out).name


def finetune(
    job: FinetuneJob, *, on_event: Callable[[Event], None] | None = None, until: int | None = None
) -> FinetuneResult:
    """Train as `job` says; resumable, exported to the store when it reaches its end."""
    run_dir = run_dir_for(job)
    if job.resume:
        job = _resumed_job(job, run_dir)
    # Everything that can be checked is checked before anything is loaded or deleted:
    # an earlier run is cleared only once the model and the data have loaded.
    _check_output(job)
    _check_run_dir(job, run_dir)
    if not Path(job.data).expanduser().exists():
        raise PocketLMError(f"training data {job.data} does not exist")
    device = job.device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = distributed.setup(device)
    try:
        return _finetune(
            job,
            run_dir=run_dir,
            world=world,
            device=distributed.device_for(world, device),
            on_event=on_event,
            until=until,
        )
    finally:
        distributed.teardown(world)


def _finetune(
    job: FinetuneJob,
    *,
    run_dir: Path,
    world: distributed.World,
    device: str,
    on_event: Callable[[Event], None] | None,
    until: int | None,
) -> FinetuneResult:
    from pocketlm.weights import loader, sources

    source = sources.resolve(job.model, offline=job.offline)
    loaded = loader.load(source, dtype=torch.float32, device=device)
    if not loaded.native:
        raise PocketLMError(
            f"{job.model} runs through transformers (an architecture pocketlm lacks); "
            "fine-tuning needs a native model (GPT-2 or the Llama family)"
        )
    model, context = loaded.model, loaded.model.config.context_length
    block_size = job.block_size or min(512, context)
    dataset = load_dataset(
        job.data,
        loaded.tokenizer,
        block_size=block_size,
        context_length=context,
        val_fraction=job.val_fraction,
        seed=job.train.seed,
    )
    if job.lora is not None:
        torch.manual_seed(job.train.seed)  # the adapters' random initialisation
        apply_lora(model, job.lora)
    else:
        model.requires_grad_(True)  # the loader hands out frozen inference models
    if world.is_main:
        _start_run_dir(job, run_dir)
    extra = {"lora": asdict(job.lora) if job.lora else None}
    trainer = Trainer(
        model,
        tokenizer=loaded.tokenizer,
        dataset=dataset,
        config=job.train,
        run_dir=run_dir,
        world=world,
        on_event=on_event,
        extra_state=extra,
    )
    if job.resume:
        trainer.resume()  # refuses other data: before run.json is rewritten, not after
    if world.is_main:
        _write_settings(run_dir, job, block_size)
    reason = trainer.train(until=until)
    val_loss = trainer.val_loss
    if val_loss is None and dataset.val is not None:
        val_loss = trainer.evaluate()  # (collective under FSDP: every process calls it)
    output = None
    if reason == "done":
        output = _save_result(job, trainer, loaded=loaded, source=source, val_loss=val_loss)
    distributed.barrier(world)
    return FinetuneResult(reason, trainer.step, trainer.total_steps, run_dir, output, val_loss)


def _save_result(
    job: FinetuneJob, trainer: Trainer, *, loaded: Any, source: Path, val_loss: float | None
) -> Path | None:
    """Export the trained model (or write the adapter); the path, on the main process."""
    model = trainer.model
    if trainer.sharded:
        # FSDP holds a shard of each tensor per process: gather the whole model (a
        # collective) and put it in an ordinary copy for the export.
        state = trainer.full_model_state()
        if trainer.world.is_main:
            model = _plain_copy(source, job, state)
    if not trainer.world.is_main:
        return None
    model.eval()
    if job.adapter_only:
        return _write_adapter(job, model, base=str(job.model))
    if job.lora is not None:
        merge_lora(model)
    lora = asdict(job.lora) if job.lora else None
    return export.export_to_store(
        job.out,
        model,
        config=loaded.config,
        tokenizer=loaded.tokenizer,
        source=source if source.is_dir() else None,
        base=str(job.model),
        overwrite=job.overwrite,
        extra={"steps": trainer.step, "lora": lora, "val_loss": val_loss},
        dtype=job.export_dtype,
    )


def _plain_copy(source: Path, job: FinetuneJob, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from pocketlm.weights import loader

    model = loader.load(source, dtype=torch.float32, device="cpu").model
    if job.lora is not None:
        apply_lora(model, job.lora)
    model.load_state_dict(state)
    return model


def _write_settings(run_dir: Path, job: FinetuneJob, block_size: int) -> None:
    text = json.dumps(_settings(job, block_size), indent=2) + "\n"
    checkpoint.write_text_atomic(run_dir / RUN_FILE, text)


def _settings(job: FinetuneJob, block_size: int) -> dict[str, Any]:
    return {
        "model": str(job.model),
        "data": str(job.data),
        "out": job.out,
        "block_size": block_size,
        "val_fraction": job.val_fraction,
        "adapter_only": job.adapter_only,
        "train": asdict(job.train),
        "lora": asdict(job.lora) if job.lora else None,
    }


def _resumed_job(job: FinetuneJob, run_dir: Path) -> FinetuneJob:
    """The saved settings of the run to resume; only the time limit may change."""
    file = run_dir / RUN_FILE
    if not file.is_file() or checkpoint.latest(run_dir) is None:
        raise PocketLMError(f"nothing to resume for '{job.out}': no checkpoint in {run_dir}")
    saved = json.loads(file.read_text(encoding="utf-8"))
    if saved["model"] != str(job.model):
        raise PocketLMError(
            f"the run '{Path(job.out).name}' fine-tunes {saved['model']}, not {job.model}; "
            "resume it with the same MODEL"
        )
    train = TrainConfig(**{**saved["train"], "max_time": job.train.max_time})
    lora = LoRAConfig(**saved["lora"]) if saved["lora"] else None
    return FinetuneJob(
        model=job.model,
        data=job.data,
        out=job.out,
        train=train,
        lora=lora,
        adapter_only=saved["adapter_only"],
        block_size=saved["block_size"],
        val_fraction=saved["val_fraction"],
        resume=True,
        overwrite=job.overwrite,
        device=job.device,
        offline=job.offline,
        run_dir=run_dir,
        export_dtype=job.export_dtype,  # how to write the result is not a training setting
    )


def _check_output(job: FinetuneJob) -> None:
    if job.adapter_only:
        out = Path(job.out).expanduser()
        if out.exists() and not job.overwrite:
            raise PocketLMError(f"{out} already exists; choose another --out or pass --overwrite")
        if job.lora is None:
            raise PocketLMError("--adapter-only needs --lora (a full fine-tune has no adapter)")
    else:
        export.check_output_name(job.out, overwrite=job.overwrite)


def _check_run_dir(job: FinetuneJob, run_dir: Path) -> None:
    """A fresh run does not silently throw away another run's checkpoints."""
    if job.resume or checkpoint.latest(run_dir) is None:
        return
    if not job.overwrite:
        raise PocketLMError(
            f"{run_dir} holds the checkpoints of an earlier run for '{Path(job.out).name}': "
            "pass --resume to continue it, or --overwrite to start again"
        )


def _start_run_dir(job: FinetuneJob, run_dir: Path) -> None:
    """The run folder; a fresh run clears an earlier one first (its settings are written
    once a resumed run's checkpoint has been accepted: `_write_settings`)."""
    if not job.resume:
        _clear_earlier_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _clear_earlier_run(run_dir: Path) -> None:
    """Take an earlier run's checkpoints, metrics and plot away (--overwrite, checked
    already): each is first renamed into one hidden folder, then that is deleted, so a
    crash in between leaves no half-deleted checkpoint that `--resume` would pick up."""
    old = [run_dir / name for name in (checkpoint.checkpoints_dir(run_dir).name, METRICS, PLOT)]
    old = [path for path in old if path.exists()]
    if not old:
        return
    trash = Path(tempfile.mkdtemp(prefix=".old-", dir=run_dir))
    for path in old:
        os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def _write_adapter(job: FinetuneJob, model: torch.nn.Module, *, base: str) -> Path:
    """The adapter folder, assembled beside its final place and renamed into it."""
    out = Path(job.out).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        save_adapter(model, work, config=job.lora, base=base)
        paths.as_umask_allows(work, folder=True)
        if out.exists():
            old = out.with_name(f".old-{out.name}")
            os.replace(out, old)
            shutil.rmtree(old)
        os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
