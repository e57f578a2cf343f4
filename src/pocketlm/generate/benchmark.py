"""Speed measurements of pocketlm itself: decode, prefill, time to first token, memory,
and the memory-bandwidth bound that decoding at batch 1 cannot beat.

Decoding one token reads every weight once, so on a CPU the limit is
bandwidth / bytes of weights read per token. `memory_bandwidth` measures the first
number (a streaming read of a buffer far larger than the caches), `bytes_per_token`
counts the second from the loaded model. Used by `pocketlm bench` and by
benchmarks/peers.py (which puts the same figures beside transformers and llama.cpp).
Knows nothing of the peers, the terminal or plotting.
"""

import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from pocketlm.generate.compiled import CompiledDecode
from pocketlm.generate.params import GenerationParams
from pocketlm.generate.request import Stats
from pocketlm.generate.sequence import Sequence
from pocketlm.generate.stream import generate_tokens
from pocketlm.kernels.gguf import GGUFEmbedding, GGUFLinear
from pocketlm.sampling import SamplingParams


@dataclass
class Measurement:
    decode_tok_s: float  # new tokens after the first / their time (batch 1, greedy)
    prefill_tok_s: float  # prompt tokens / time of one prefill of `prefill_tokens`
    ttft_ms: float  # a `prompt_tokens` prompt to its first token
    peak_rss_mb: float  # this process's peak resident memory so far
    bytes_per_token: int  # weight bytes one decode step reads

    def as_dict(self) -> dict:
        return asdict(self)


def measure(
    model: nn.Module,
    *,
    prompt_tokens: int,  # the protocol's sizes are the callers' (`pocketlm bench`'s options)
    new_tokens: int,
    prefill_tokens: int,
    repeats: int = 3,
    vocab_floor: int = 1000,
    compile: bool = False,
) -> Measurement:
    """Best of `repeats` runs of greedy decoding and of a prefill, after one warm-up (which
    also compiles the decode step with `compile`: its cost is not in the figures)."""
    context = model.config.context_length
    prefill_tokens = min(prefill_tokens, context - 1)
    new_tokens = min(new_tokens, context - prompt_tokens)
    # Plain token ids well inside every vocabulary: what matters here is shapes, not text.
    ids = [vocab_floor + (7 * i) % 5000 for i in range(max(prompt_tokens, prefill_tokens))]
    greedy = GenerationParams(SamplingParams(temperature=0), max_tokens=new_tokens)
    seq = Sequence(
        model,
        max_seq_len=min(context, max(prefill_tokens, prompt_tokens + new_tokens) + 1),
        decode=CompiledDecode(model) if compile else None,
    )
    warm = replace(greedy, max_tokens=4)
    list(generate_tokens(seq, ids[:prompt_tokens], warm))  # warm-up
    decode, ttft = 0.0, float("inf")
    for _ in range(repeats):
        seq.truncate(0)
        stats = Stats()
        list(generate_tokens(seq, ids[:prompt_tokens], greedy, stats=stats))
        decode = max(decode, stats.tokens_per_second)
        ttft = min(ttft, stats.time_to_first_token)
    prefill = float("inf")
    for _ in range(repeats):
        seq.truncate(0)
        started = time.perf_counter()
        seq.prefill(ids[:prefill_tokens])
        prefill = min(prefill, time.perf_counter() - started)
    return Measurement(
        decode_tok_s=decode,
        prefill_tok_s=prefill_tokens / prefill,
        ttft_ms=ttft * 1000,
        peak_rss_mb=peak_rss_mb(),
        bytes_per_token=bytes_per_token(model),
    )


def bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter and buffer except the
    embedding tables (a lookup reads one row), counting a tied head once as a matrix."""
    # A GGUF file's embedding kept as stored (GGUFEmbedding) is a lookup table too; its
    # head, when tied, is a GGUFLinear over the same buffers (counted as a matrix).
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    embeddings |= {
        id(t) for m in model.modules() if isinstance(m, GGUFEmbedding) for t in m.buffers()
    }
    heads = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    heads |= {id(t) for m in model.modules() if isinstance(m, GGUFLinear) for t in m.buffers()}
    total, seen = 0, set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen or "inv_freq" in name:
            continue
        seen.add(id(tensor))
        if id(tensor) in embeddings and id(tensor) not in heads:
            continue
        total += tensor.numel() * tensor.element_size()
    # A head tied to the embedding but quantized or split separately is a buffer of its own
    # (counted); a tied head that shares the embedding's tensor is counted once above.
    return total


def memory_bandwidth(*, megabytes: int = 512, repeats: int = 20) -> float:
    """Measured read bandwidth in GB/s: the best of `repeats` sums over a large buffer, with
    torch's current thread count (the same threads the models use)."""
    buffer = torch.ones(megabytes * (1 << 20) // 4, dtype=torch.float32)
    buffer.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best / 1e9


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB. On Linux it is VmHWM: getrusage's
    ru_maxrss also counts the parent's memory at fork time, so a benchmark child spawned
    by a large parent would inherit the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024
