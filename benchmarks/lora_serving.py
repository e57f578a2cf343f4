"""What serving LoRA adapters unmerged costs a batch (`pocketlm serve --lora`): a decode
step of 8 rows and a 128-token prefill, with no adapter loaded (no wrapper), adapters loaded
but only bare-model rows, every row on one adapter, and the bare model and two adapters
mixed in one batch; and how close each adapter's logits come to its merged model's.

Two random rank-R adapters are made for MODEL as `finetune --lora --adapter-only` saves
them (one on q/k/v/o, one on v and the MLP), then the model is loaded twice as it is served
(a GGUF as stored), once plain and once with the adapters attached. The forward passes are
the scheduler's own calls (`make_cache`, the model, `MultiLoRA.select`). Medians of
--rounds interleaved rounds; read the ratios, not the absolute times.

    python benchmarks/lora_serving.py                       # the embedded SmolLM2-135M
    python benchmarks/lora_serving.py MODEL --threads 2 --rank 16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import pocketlm
from pocketlm.models import make_cache
from pocketlm.serve.adapters import load_adapters
from pocketlm.train.lora import LoRAConfig, apply_lora, lora_modules, save_adapter
from pocketlm.weights import loader
from pocketlm.weights.sources import resolve

TARGETS = {"attention": [], "v+mlp": ["v_proj", "gate_proj", "up_proj", "down_proj"]}


def make_adapter(path: Path, folder: Path, *, targets: list[str], rank: int, seed: int) -> Path:
    model = loader.load(path, dtype=torch.float32).model  # the checkpoint's own layers
    config = LoRAConfig(rank=rank, alpha=2.0 * rank, targets=targets)
    apply_lora(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # A keeps its random start; B as after some training
        for layer in lora_modules(model).values():
            layer.lora_B.copy_(0.02 * torch.randn(layer.lora_B.shape, generator=generator))
    folder.mkdir()
    save_adapter(model, folder, config=config, base=str(path))
    return folder


def timed(call) -> float:  # noqa: ANN001 - a no-argument function
    with torch.inference_mode():
        start = time.perf_counter()
        call()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve(args.model)
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    folders = {
        name: make_adapter(path, work / name, targets=targets, rank=args.rank, seed=i)
        for i, (name, targets) in enumerate(TARGETS.items())
    }
    plain, served = pocketlm.load(path), pocketlm.load(path)
    adapters = load_adapters(served, folders)
    rows, start = 8, 64
    caches = {}
    for lm in (plain, served):  # each with 8 rows of 64 tokens already in its cache
        caches[id(lm)] = make_cache(lm.model, batch_size=rows, max_seq_len=256)
        tokens = torch.randint(0, 1000, (rows, start))
        timed(lambda lm=lm, t=tokens: lm.model(t, torch.arange(start).expand(rows, -1), caches[id(lm)]))  # fmt: skip
    step, position = torch.randint(0, 1000, (rows, 1)), torch.full((rows, 1), start)
    prompt, positions = torch.randint(0, 1000, (1, 128)), torch.arange(128)[None]
    cases = {  # label -> (LM, row adapters of the decode step, the prefill's adapter)
        "no adapter loaded (no wrapper)": (plain, None, None),
        "adapters loaded, 8 bare-model rows": (served, [0] * 8, [0]),
        "8 rows of one adapter": (served, [1] * 8, [1]),
        "bare + 2 adapters mixed (3/3/2)": (served, [0, 1, 2, 0, 1, 2, 0, 1], [2]),
    }
    times = {label: ([], []) for label in cases}
    for _ in range(args.rounds):
        for label, (lm, decode_rows, prefill_row) in cases.items():
            if decode_rows is not None:
                adapters.select(decode_rows)
            cache = caches[id(lm)]
            times[label][0].append(timed(lambda lm=lm, c=cache: lm.model(step, position, c)))
            if prefill_row is not None:
                adapters.select(prefill_row)
            times[label][1].append(
                timed(lambda lm=lm: lm.model(prompt, positions, logits_to_keep=1))
            )
    print(f"{path.name}, rank {args.rank}, {args.threads} thread(s), {args.rounds} rounds")
    base_decode, base_prefill = (statistics.median(t) for t in times[next(iter(cases))])
    for label, (decode, prefill) in times.items():
        d, p = statistics.median(decode), statistics.median(prefill)
        print(f"  {label:36s} decode 8 rows {d * 1e3:7.1f} ms ({d / base_decode:.2f})"
              f"   prefill 128 {p * 1e3:7.1f} ms ({p / base_prefill:.2f})")  # fmt: skip
    ids = prompt[:, :32]
    for index, (name, folder) in enumerate(folders.items(), start=1):
        adapters.select([index])
        with torch.inference_mode():
            ours = served.model(ids, positions[:, :32])[0]
            merged = pocketlm.load(path, adapter=folder).model(ids, positions[:, :32])[0]
        print(f"  {name}: max |served - merged| {(ours - merged).abs().max():.3g}")


if __name__ == "__main__":
    main()
