"""A GGUF file run in its own quantization, the default: the real SmolLM2 (Q4_1 matrices,
a Q8_0 embedding tied to the head) kept as stored and multiplied by pocketlm's kernels
(kernels.gguf), against transformers loading the same file (it dequantizes exactly) and
gguf's own dequantizer; the memory check that refuses a load before it starts.

Tolerances follow from the kernels' precision: decode rounds activations to int8 per 32
values, prefill rounds both operands to bf16 (kernels/gguf.py), so logits move by a few
hundredths of their spread; what must hold is the distribution (KL), the greedy choice
wherever it is not a near tie, and the perplexity within 0.5% (issue 14's target).
"""

import math
import re
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from torch import nn

import pocketlm
from pocketlm.kernels.gguf import GGUFEmbedding, GGUFLinear
from pocketlm.models import make_cache
from pocketlm.weights.card import human_bytes
from pocketlm.weights.memory import FIXED_OVERHEAD, available_bytes
from test_cli_run import POCKETLM

TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four "
    "papers that changed physics: on the photoelectric effect, Brownian motion, special "
    "relativity and the equivalence of mass and energy. def add(a, b):\n    return a + b\n"
    "Paris is the capital of France; Berlin is the capital of Germany; Rome is the capital "
    "of Italy. The mitochondria is the powerhouse of the cell. 3 + 4 = 7, 12 * 12 = 144. "
)


def file_types(path) -> dict[str, str]:
    """Tensor name -> GGML type name, read by gguf-py (not by pocketlm)."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_default_load_keeps_every_matrix_as_the_file_stores_it(smollm2_stored, smollm2_gguf):
    model = smollm2_stored.model
    plain = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]
    assert not plain, f"{plain[:3]} were expanded to float"
    types = file_types(smollm2_gguf)
    want = {types["blk.0.attn_q.weight"], types["blk.0.ffn_down.weight"]}
    layer = model.model.layers[0]
    got = {part.layout.ggml_type for lin in (layer.self_attn.qkv_proj, layer.mlp.down_proj)
           for part in lin.parts}  # fmt: skip
    assert got == want
    embedding = model.model.embed_tokens
    assert isinstance(embedding, GGUFEmbedding)
    assert embedding.matrix.layout.ggml_type == types["token_embd.weight"]
    # The tied head reads the embedding's own bytes: the matrix is held once.
    assert isinstance(model.lm_head, GGUFLinear) and model.lm_head.parts[0] is embedding.matrix
    held = sum(b.numel() * b.element_size() for b in model.buffers())
    held += sum(p.numel() * p.element_size() for p in model.parameters())
    assert held <= 1.05 * smollm2_gguf.stat().st_size


def test_embedding_rows_are_gguf_s_dequantized_rows(smollm2_stored, smollm2_gguf):
    tensor = next(t for t in gguf.GGUFReader(smollm2_gguf).tensors if t.name == "token_embd.weight")
    table = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # (vocab, width)
    ids = torch.tensor([[0, 5, 49151, 5], [1000, 2, 2, 31337]])
    got = smollm2_stored.model.model.embed_tokens(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 4, table.shape[1])
    assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(table[ids.numpy()])))
    with pytest.raises(IndexError, match="token ids must lie in"):
        smollm2_stored.model.model.embed_tokens(torch.tensor([49152]))


def assert_close_distributions(got: torch.Tensor, want: torch.Tensor) -> None:
    """(T, vocab) logits: small KL everywhere, the same argmax but for near ties."""
    kl = torch.nn.functional.kl_div(
        got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    assert kl.mean() < 5e-3 and kl.max() < 5e-2, (kl.mean(), kl.max())
    top = want.topk(2).values
    clear = top[:, 0] - top[:, 1] > 0.5
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


@pytest.fixture(scope="module")
def text_ids(smollm2_stored) -> list[int]:
    return smollm2_stored.tokenizer.encode(TEXT)


def test_prefill_logits_close_to_transformers(smollm2_stored, smollm2_transformers, text_ids):
    ids = torch.tensor([text_ids])
    with torch.no_grad():
        want = smollm2_transformers(ids).logits[0]
        got = smollm2_stored.model(ids, torch.arange(len(text_ids))[None])[0]
    assert len(text_ids) > 32  # the prefill path: bf16 tiles of the dequantized weights
    assert_close_distributions(got, want)


def test_decode_logits_close_to_transformers(smollm2_stored, smollm2_transformers, text_ids):
    """One token at a time through the KV cache: the packed decode kernels."""
    ids, model = text_ids[:48], smollm2_stored.model
    cache = make_cache(model, batch_size=1, max_seq_len=64)
    steps = []
    with torch.no_grad():
        want = smollm2_transformers(torch.tensor([ids])).logits[0]
        for i, token in enumerate(ids):
            steps.append(model(torch.tensor([[token]]), torch.tensor([[i]]), cache)[0, -1])
    assert_close_distributions(torch.stack(steps), want)


def mean_nll(logits_of, ids: list[int], window: int = 256) -> float:
    """Mean negative log-likelihood over non-overlapping windows (every token but each
    window's first), the same windows whatever computes the logits."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        w = torch.tensor([ids[start : start + window]])
        with torch.no_grad():
            logp = logits_of(w)[0, :-1].float().log_softmax(-1)
        total -= logp.gather(1, w[0, 1:, None]).sum().item()
        count += w.shape[1] - 1
    return total / count


def test_perplexity_within_half_a_percent_of_transformers(
    smollm2_stored, smollm2_transformers, text_ids
):
    ids = (text_ids * 8)[:1024]
    theirs = mean_nll(lambda w: smollm2_transformers(w).logits, ids)
    ours = mean_nll(lambda w: smollm2_stored.model(w, torch.arange(w.shape[1])[None]), ids)
    assert abs(math.exp(ours) / math.exp(theirs) - 1) < 0.005, (math.exp(ours), math.exp(theirs))


PEAK = """
import re, sys
import torch, pocketlm
from pocketlm.kernels.cpp import gguf_ops
gguf_ops()
status = lambda key: int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read())[1])
before = status("VmRSS")
lm = pocketlm.load(sys.argv[1])
lm.generate("Hello", max_tokens=4)
print((status("VmHWM") - before) * 1024)
"""


def test_peak_memory_of_a_default_load_follows_the_file(smollm2_gguf):
    """A fresh process: loading as stored adds at most 1.2x the file plus the fixed
    overhead (tokenizer, first cache blocks); the fp32 weights alone would be 5x it."""
    out = subprocess.run([sys.executable, "-c", PEAK, str(smollm2_gguf)],
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    peak = int(out.stdout.split()[-1])
    assert peak <= 1.2 * smollm2_gguf.stat().st_size + FIXED_OVERHEAD, human_bytes(peak)


def test_show_prints_the_type_mix_and_the_default_ram(smollm2_gguf):
    out = subprocess.run([POCKETLM, "show", str(smollm2_gguf)],
                         capture_output=True, text=True, timeout=120, check=True).stdout  # fmt: skip
    sizes: dict[str, int] = {}
    for t in gguf.GGUFReader(smollm2_gguf).tensors:
        sizes[t.tensor_type.name] = sizes.get(t.tensor_type.name, 0) + int(t.n_bytes)
    total = sum(sizes.values())
    mix = ", ".join(
        f"{k} {100 * v / total:.0f}%" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])
    )
    assert re.search(rf"^tensor types +{re.escape(mix)}$", out, re.M), out
    ram = re.search(r"^ram default +([\d.]+) MB \(as stored", out, re.M)
    assert ram and abs(float(ram[1]) * 1e6 / smollm2_gguf.stat().st_size - 1) < 0.05, out


def huge_llama(path, *, layers: int, hidden: int = 4096, ffn: int = 14336) -> int:
    """A Mistral-shaped F32 GGUF of `layers` layers whose tensor data is a hole (a sparse
    file: no disk, nothing to read); returns its parameter count."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(32)
    w.add_head_count_kv(8)
    w.add_layer_norm_rms_eps(1e-5)
    shapes = {"token_embd.weight": (32000, hidden), "output_norm.weight": (hidden,),
              "output.weight": (32000, hidden)}  # fmt: skip
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                   f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (1024, hidden),
                   f"blk.{i}.attn_v.weight": (1024, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                   f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                   f"blk.{i}.ffn_down.weight": (hidden, ffn)}  # fmt: skip
    for name, shape in shapes.items():
        w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * math.prod(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    params = sum(math.prod(s) for s in shapes.values())
    with open(path, "r+b") as f:  # the data: a hole as long as the tensors, aligned
        f.truncate(
            path.stat().st_size + 32 + sum(-(-4 * math.prod(s) // 32) * 32 for s in shapes.values())
        )
    return params


def refusal(path, *flags) -> str:
    result = subprocess.run([POCKETLM, "run", str(path), "Hello", "-n", "2", *flags],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1 and result.stdout == "", result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_a_model_too_big_for_memory_is_refused_naming_what_would_fit(tmp_path):
    free = available_bytes()
    assert free is not None, "this test needs /proc/meminfo"
    # fp32 about twice the memory free, so int4 (a sixth of it) fits.
    layers = max(2, math.ceil(2 * free / (4 * 218_112_000)))
    params = huge_llama(tmp_path / "big.gguf", layers=layers)
    error = refusal(tmp_path / "big.gguf")  # F32 matrices: as stored is fp32
    assert re.match(r"error: big.gguf as stored needs about [\d.]+ GB of memory and "
                    r"[\d.]+ GB is available; load it with .*--quantize int4 \([\d.]+ GB\)$",
                    error), error  # fmt: skip
    assert human_bytes(4 * params + FIXED_OVERHEAD).split()[0] in error
    error = refusal(tmp_path / "big.gguf", "--dtype", "bf16")
    assert "big.gguf in bfloat16 needs about" in error and "--quantize int4" in error


def test_a_model_too_big_for_any_way_says_so(tmp_path):
    # A 70B shape: no way of loading it fits in a machine's RAM that runs this suite.
    huge_llama(tmp_path / "huge.gguf", layers=80, hidden=8192, ffn=28672)
    error = refusal(tmp_path / "huge.gguf", "--quantize", "int4")
    assert "huge.gguf in int4 needs about" in error
    assert error.endswith("free some memory, or choose a smaller model or a smaller "
                          "quantization of it\n")  # fmt: skip


@pytest.fixture(scope="module")
def every_format(tmp_path_factory):
    """test_gguf's Llama with a different block format in each matrix (layer 0's q is F32,
    k Q8_0, v Q4_K; layer 1's o BF16, gate F16...), and a tiny BPE vocabulary."""
    from test_gguf import VOCAB, write_llama_family

    tokens = [chr(0x41 + i) for i in range(VOCAB - 1)] + ["AB"]
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
          "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["A B"],
          "tokenizer.ggml.token_type": [1] * VOCAB}  # fmt: skip
    path = tmp_path_factory.mktemp("every") / "every-format.gguf"
    write_llama_family(path, "llama", extra_kv=kv)
    return path


@pytest.mark.parametrize(
    ("options", "qkv"),
    [({}, ["DenseMatrix", "QuantMatrix", "QuantMatrix"]),  # as stored; F32 q joins as dense
     ({"quantize": "int8"}, None),  # fused into one Int8Linear
     ({"quantize": "int4"}, ["Int4Linear", "Int8Linear", "Int4Linear"]),  # kept apart
     ({"dtype": "bf16"}, None)],
    ids=["default", "int8", "int4", "bf16"],
)  # fmt: skip
def test_every_format_in_every_mode(every_format, options, qkv):
    """q, k and v of different formats fuse where their layers can, else stay apart; each
    mode's logits follow the exact fp32 model's."""
    ids, positions = torch.tensor([[1, 5, 9, 3, 7, 62, 0]]), torch.arange(7)[None]
    with torch.no_grad():
        want = pocketlm.load(every_format, dtype="fp32").model(ids, positions)
        lm = pocketlm.load(every_format, **options)
        got = lm.model(ids, positions).float()
    attention = lm.model.model.layers[0].self_attn
    if qkv and isinstance(attention.qkv_proj, GGUFLinear):
        assert [type(part).__name__ for part in attention.qkv_proj.parts] == qkv
    elif qkv:
        assert attention.qkv_proj is None
        assert [
            type(p).__name__ for p in (attention.q_proj, attention.k_proj, attention.v_proj)
        ] == qkv
    error = (got - want).norm() / want.norm()
    # int4 rounds every matrix again, to 16 levels per 32 weights; the others keep (int8:
    # nearly) the file's values and round activations only.
    assert error < (0.06 if options.get("quantize") == "int4" else 0.02), error


def test_compiled_decode_of_a_gguf_as_stored_gives_the_eager_tokens(every_format):
    """`--compile` on the default path: the packed matmuls go into the graph (their fake
    shapes are registered), the embedding's data-dependent lookup stays outside it."""
    from pocketlm.generate.compiled import CompiledDecode
    from pocketlm.generate.sequence import Sequence

    lm = pocketlm.load(every_format)
    prompt = [1, 5, 9, 3]

    def greedy_ids(decode=None) -> list[int]:
        seq = Sequence(lm.model, decode=decode)
        logits, out = seq.prefill(prompt), []
        for _ in range(12):
            out.append(int(logits.argmax()))
            logits = seq.step(out[-1])
        return out

    step = CompiledDecode(lm.model)
    assert greedy_ids(step) == greedy_ids() and step.calls >= 11


def test_a_model_as_stored_copies_and_the_copy_computes_the_same(every_format):
    import copy

    model = pocketlm.load(every_format).model
    twin = copy.deepcopy(model)
    ids, positions = torch.tensor([[3, 1, 4, 1, 5]]), torch.arange(5)[None]
    with torch.no_grad():
        assert torch.equal(twin(ids, positions), model(ids, positions))
