"""What a training run records: metrics as JSON lines, and a loss-curve picture.

`RUN_DIR/metrics.jsonl` gets one object a line: {"step", "loss", "lr", "tokens_per_second",
...} for training steps, {"step", "val_loss"} for evaluations and {"step", "sample"} for
sample generations. `RUN_DIR/loss.png` plots training and validation loss against the
step (matplotlib, headless). Knows nothing of models.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pocketlm import paths
from pocketlm.train.checkpoint import write_text_atomic

METRICS = "metrics.jsonl"
PLOT = "loss.png"


class MetricsLog:
    """Appends records to RUN_DIR/metrics.jsonl."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        return records

    def truncate(self, step: int) -> None:
        """Forget records after `step` (a resumed run repeats those steps)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_losses(run_dir: Path) -> Path | None:
    """Write RUN_DIR/loss.png from the metrics; None when there is nothing to plot yet."""
    records = MetricsLog(run_dir).read()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: write a file
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    if train:
        axes.plot(*zip(*train, strict=True), label="training", linewidth=1)
    if val:
        axes.plot(*zip(*val, strict=True), "o-", label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend()
    path = Path(run_dir) / PLOT
    fd, tmp = tempfile.mkstemp(prefix=".loss-", suffix=".png", dir=run_dir)
    os.close(fd)
    figure.savefig(tmp)
    paths.as_umask_allows(tmp)
    os.replace(tmp, path)
    return path
