"""Peak RSS while loading a GPT-2 checkpoint, as a multiple of its weights' size.

Makes a GPT-2 XL-shaped checkpoint (1.56B parameters, random weights, HF layout, fp32
safetensors) once, then loads it with pocketlm in a fresh process per dtype and reports
peak RSS (ru_maxrss) / bytes of the weights at that dtype. The target is under 1.3x:
weights are memory-mapped and assigned to a meta-device model one tensor at a time.

    python benchmarks/load_memory.py [--shape xl|large|medium|small] [--dir PATH]
"""

import argparse
import json
import math
import resource
import subprocess
import sys
from pathlib import Path

SHAPES = {
    "small": dict(n_embd=768, n_layer=12, n_head=12),
    "medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "large": dict(n_embd=1280, n_layer=36, n_head=20),
    "xl": dict(n_embd=1600, n_layer=48, n_head=25),
}


def make_checkpoint(folder: Path, shape: str) -> None:
    """Write config.json + model.safetensors tensor by tensor in HF GPT-2 naming."""
    import torch
    from safetensors.torch import save_file

    c = dict(vocab_size=50257, n_positions=1024, model_type="gpt2", **SHAPES[shape])
    folder.mkdir(parents=True, exist_ok=True)
    C, L = c["n_embd"], c["n_layer"]
    shapes = {
        "transformer.wte.weight": (50257, C),
        "transformer.wpe.weight": (1024, C),
        "transformer.ln_f.weight": (C,),
        "transformer.ln_f.bias": (C,),
    }
    for i in range(L):
        p = f"transformer.h.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (C,),
                p + "ln_1.bias": (C,),
                p + "ln_2.weight": (C,),
                p + "ln_2.bias": (C,),
                p + "attn.c_attn.weight": (C, 3 * C),
                p + "attn.c_attn.bias": (3 * C,),
                p + "attn.c_proj.weight": (C, C),
                p + "attn.c_proj.bias": (C,),
                p + "mlp.c_fc.weight": (C, 4 * C),
                p + "mlp.c_fc.bias": (4 * C,),
                p + "mlp.c_proj.weight": (4 * C, C),
                p + "mlp.c_proj.bias": (C,),
            }
        )
    tensors = {k: torch.randn(s) * 0.02 for k, s in shapes.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(c))


def measure(folder: Path, dtype: str) -> dict:
    """In this (fresh) process: load, then report peak RSS against the weights' bytes."""
    import torch
    from safetensors import safe_open

    import pocketlm

    with safe_open(folder / "model.safetensors", framework="pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    weight_bytes = params * {"fp32": 4, "bf16": 2}[dtype]
    # As a user gets it: loaded, then prepared for decoding (fp32 re-laid out per thread).
    model = pocketlm.load(folder, dtype=dtype, device="cpu").model
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # fp32 weights stay memory-mapped views until read: one forward pass touches them all.
    with torch.inference_mode():
        model(torch.tensor([[464, 3290]]), torch.tensor([[0, 1]]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "dtype": dtype,
        "params": params,
        "weights_gb": weight_bytes / 1e9,
        "load_rss_gb": after_load / 1e9,
        "peak_rss_gb": peak / 1e9,
        "ratio": peak / weight_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="xl", choices=SHAPES)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/pocketlm-bench-gpt2"))
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.dir / args.shape
    if args.measure:
        print(json.dumps(measure(folder, args.measure)))
        return
    if not (folder / "model.safetensors").is_file():
        make_checkpoint(folder, args.shape)
    for dtype in ("fp32", "bf16"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--shape",
                args.shape,
                "--dir",
                str(args.dir),
                "--measure",
                dtype,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"GPT-2 {args.shape} {r['dtype']}: {r['params'] / 1e9:.2f}B params, weights "
            f"{r['weights_gb']:.2f} GB, peak RSS {r['load_rss_gb']:.2f} GB after loading, "
            f"{r['peak_rss_gb']:.2f} GB after a forward pass = {r['ratio']:.2f}x the weights"
        )


if __name__ == "__main__":
    main()
