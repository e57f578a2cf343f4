"""A GGUF model run in its own quantization (pocketlm.kernels.gguf) against the loader's
current paths, on the embedded SmolLM2-135M (Q4_1, its tied head Q8_0): greedy tokens,
perplexity, decode/prefill speed. A prototype of issue 14's loader step, built here from
the loader's pieces without changing what `pocketlm.load` gives anyone.

Modes: fp32 (today's default: the file dequantized to fp32, split matmuls), int4 and int8
(`--quantize`), gguf (every matrix a GGUFLinear on the file's own bytes, the tied head
from the embedding's Q8_0 bytes; fused q/k/v and gate/up). Greedy: 32 tokens from each
of test_smollm2.py's prompts, compared with fp32 (itself equal to transformers on this
file, tests/test_smollm2.py) up to the first difference, with fp32's top-2 logit margin
there. Perplexity: pocketlm's strided perplexity of this repository's README (the same
ids for every mode). Speed: generate.benchmark.measure (batch 1, 32-token prompt, 128 new
tokens, a 128-token prefill), round-robin over the modes, best round.

    python benchmarks/gguf_model.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pocketlm.api import LM  # noqa: E402
from pocketlm.features.scores import perplexity  # noqa: E402
from pocketlm.generate.benchmark import measure  # noqa: E402
from pocketlm.kernels.gguf import GGUFLinear  # noqa: E402
from pocketlm.kernels.prepare import fuse  # noqa: E402
from pocketlm.weights import loader, sources, tables  # noqa: E402
from pocketlm.weights.gguf import gguf_raw_tensors, read_gguf  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhat is the largest planet in the solar system?<|im_end|>\n"
    "<|im_start|>assistant\n",
]


def gguf_lm(path: Path) -> LM:
    """The model with every nn.Linear a GGUFLinear on the file's bytes, then fused."""
    loaded = loader.load(path, prepare=False)
    model, raw = loaded.model, gguf_raw_tensors(read_gguf(path))
    head, embedding = tables.TIED_KEYS[tables.family(loaded.config["model_type"])]
    parents = [m for m in model.modules() if any(type(c) is nn.Linear for c in m.children())]
    for parent in parents:
        for attr, linear in list(parent.named_children()):
            if type(linear) is not nn.Linear:
                continue
            name = next(n for n, m in model.named_modules() if m is linear)
            key = f"{name}.weight"
            kind, data, shape = raw[embedding if key == head and key not in raw else key]
            bias = None if linear.bias is None else linear.bias.detach().float()
            setattr(parent, attr, GGUFLinear.from_gguf(data, kind, tuple(shape), bias))
    fuse(model)
    return LM(loaded, name="smollm2-gguf")


def load_modes(path: Path) -> dict[str, LM]:
    modes = {"fp32": LM(loader.load(path, prepare=True), name="fp32")}
    for q in ("int8", "int4"):
        modes[q] = LM(loader.load(path, prepare=True, quantize=q), name=q)
    modes["gguf"] = gguf_lm(path)
    return modes


def greedy(modes: dict[str, LM]) -> dict[str, list]:
    """Per mode, per prompt: tokens equal to fp32's before the first difference (of 32),
    and fp32's top-2 margin at that step."""
    ref = modes["fp32"]
    out = {}
    for name, lm in modes.items():
        rows = []
        for prompt in PROMPTS:
            ids = ref.tokenizer.encode(prompt)
            want = ref.generate(ids, max_tokens=32, temperature=0).tokens
            got = lm.generate(ids, max_tokens=32, temperature=0).tokens
            pairs = enumerate(zip(want, got, strict=False))
            same = next((i for i, (a, b) in pairs if a != b), min(len(want), len(got)))
            margin = None
            if same < min(len(want), len(got)):
                with torch.inference_mode():
                    seq = ids + want[:same]
                    logits = ref.model(torch.tensor([seq]), torch.arange(len(seq))[None])[0, -1]
                top = logits.topk(2).values
                margin = float(top[0] - top[1])
            rows.append({"agree": same, "of": len(want), "fp32_margin": margin})
        out[name] = rows
    return out


def perplexities(modes: dict[str, LM]) -> dict[str, float]:
    ids = modes["fp32"].tokenizer.encode((ROOT / "README.md").read_text())[:2048]
    with torch.inference_mode():
        return {
            name: perplexity(lm.model, ids, context=512).perplexity for name, lm in modes.items()
        }


def speeds(modes: dict[str, LM], rounds: int) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, lm in modes.items():
            m = measure(lm.model, prompt_tokens=32, new_tokens=128, prefill_tokens=128, repeats=1)
            got = best.setdefault(name, m.as_dict())
            got["decode_tok_s"] = max(got["decode_tok_s"], m.decode_tok_s)
            got["prefill_tok_s"] = max(got["prefill_tok_s"], m.prefill_tok_s)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modes = load_modes(sources.resolve(None))
    result = {"greedy": greedy(modes), "perplexity": perplexities(modes)}
    result["speed"] = speeds(modes, args.rounds)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"gguf_model-{stamp}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
