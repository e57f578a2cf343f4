"""The helpers and checks every family's test shares (tests/test_qwen3.py, test_moe.py,
test_phi3.py, test_gemma.py, test_llama_variants.py, and the LayerNorm families'
test_gpt_neox.py, test_falcon.py, test_stablelm.py, test_starcoder2.py): random tokens,
greedy ids from pocketlm and from transformers, norm weights made random (transformers
starts them at 1, or 0, where a norm left out, swapped or shared where it should not be
hides), the HF folders, conversions and (ours, transformers') pairs the fixtures hand
out, a request run through the server's scheduler. The whole checks (used as they are
by the LayerNorm families) compare against `transformers`' own class on the same random
weights and the GGUF llama.cpp's converter makes of them: logits at several positions,
greedy ids, the KV cache, batched serving, GGUF loads (dequantized and as stored)."""

import threading

import torch
from torch import nn

import pocketlm
from checkpoints import hf_model
from convert import Conversion, make_convertible
from pocketlm.generate.params import GenerationParams
from pocketlm.generate.sequence import Sequence
from pocketlm.generate.stream import generate_tokens
from pocketlm.models import make_cache
from pocketlm.sampling import SamplingParams
from pocketlm.serve.scheduler import Request, Scheduler
from pocketlm.weights import card, loader, tables
from pocketlm.weights.config import read_config

PROMPT = [15496, 995, 11, 703, 389, 345]  # "Hello world, how are you" in GPT-2's ids
PROMPTS = [[464, 3290], [15496, 995, 11], [40, 588, 257, 1310, 286], [1, 2, 3, 4, 5, 6, 7, 8]]


def randomize_norms(folder, *, rms: bool = False, center: float = 1.0, scale=None) -> None:
    """Norm weights made random, saved back into the folder. LayerNorm (the default):
    every nn.LayerNorm's weight 1 + noise and bias noise. `rms`: every parameter named
    *norm.weight `center` + noise (Gemma stores its scale less 1: center 0). `scale`
    (name suffixes, factor): those weights multiplied too (a MoE's routers, q and k)."""
    model = hf_model(folder)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if rms:
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(center + 0.5 * torch.randn(p.shape, generator=generator))
                elif scale is not None and name.endswith(scale[0]):
                    p.mul_(scale[1])
        else:
            for module in model.modules():
                if isinstance(module, nn.LayerNorm):
                    weight, bias = module.weight, module.bias
                    weight.copy_(1 + 0.5 * torch.randn(weight.shape, generator=generator))
                    if bias is not None:
                        bias.copy_(0.5 * torch.randn(bias.shape, generator=generator))
    model.save_pretrained(folder)


def make_folders(tmp_path_factory, cases: dict, model_type: str, *, prefix=None, **norms) -> dict:
    """Each case's HF folder (random weights, saved by transformers' own class), its norms
    made random (`norms`: randomize_norms' switches)."""
    made = {}
    for name, config in cases.items():
        folder = tmp_path_factory.mktemp(f"{prefix or model_type}-{name}")
        made[name] = make_convertible(folder, model_type=model_type, **config)
        randomize_norms(folder, **norms)
    return made


def start_conversions(folders: dict, gguf_cases: dict) -> dict[str, Conversion]:
    """Every GGUF case (name -> (folder's case, outtype)) converted at once (they overlap)."""
    return {
        name: Conversion(folders[case], folders[case].parent / f"{name}.gguf", outtype=outtype)
        for name, (case, outtype) in gguf_cases.items()
    }


def load_pair(folder):
    """(ours, transformers') models of the folder."""
    return loader.load(folder).model, hf_model(folder)


def tokens(rows: int, n: int, seed: int, *, vocab: int = 50257, low: int = 0) -> torch.Tensor:
    """Random ids in [low, vocab): GPT-2's vocabulary unless the family's is another."""
    return torch.randint(low, vocab, (rows, n), generator=torch.Generator().manual_seed(seed))


def positions(start: int, n: int, rows: int = 1) -> torch.Tensor:
    return torch.arange(start, start + n)[None].expand(rows, n)


def greedy(model, prompt: list[int], n: int) -> list[int]:
    params = GenerationParams(SamplingParams(temperature=0.0), max_tokens=n)
    return [s.token for s in generate_tokens(Sequence(model), prompt, params)]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def hf_names(model) -> dict[str, torch.Tensor]:
    """Our model's state dict (HF names already) with a tied head written out."""
    state = dict(model.state_dict())
    head, embedding = tables.TIED_KEYS[tables.family(model.config.model_type)]
    state.setdefault(head, state[embedding])
    return state


def assert_logits_match(ours, theirs, *, atol: float = 1e-4) -> None:
    """Two rows of 40 tokens from positions 0, 17 and 150 (past any window of 8)."""
    batch = tokens(2, 40, seed=1)
    for start in (0, 17, 150):
        at = positions(start, 40, rows=2)
        with torch.no_grad():
            expected, got = theirs(batch, position_ids=at).logits, ours(batch, at)
        assert expected.abs().max() > 0.1  # logits that say something
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def assert_cache_matches(ours, theirs) -> None:
    """A prefill of 20 then 10 one-token steps through the cache give the whole-sequence
    logits of transformers."""
    seq = tokens(1, 30, seed=2)
    with torch.no_grad():
        expected = theirs(seq).logits
        cache = make_cache(ours, batch_size=1, max_seq_len=64)
        prefill = ours(seq[:, :20], positions(0, 20), cache)
        steps = [ours(seq[:, i : i + 1], positions(i, 1), cache) for i in range(20, 30)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), expected, atol=1e-4, rtol=0)


def assert_batched_equals_alone(
    folder, *, prompts=PROMPTS, max_tokens: int = 10, timeout: float = 60, **load
) -> None:
    """The server's scheduler, the prompts in one batch, gives each request its tokens
    alone (`load`: pocketlm.load's options, e.g. quantize)."""
    lm = pocketlm.load(folder, **load)
    alone = [lm.generate(ids, max_tokens=max_tokens, temperature=0).tokens for ids in prompts]
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=4, max_queue=8)
    scheduler.start()
    try:
        runs = [Run(ids, max_tokens=max_tokens) for ids in prompts]
        scheduler.submit([r.request for r in runs])
        assert [r.wait(timeout) for r in runs] == alone
    finally:
        scheduler.stop()


class Run:
    """A greedy request whose tokens are collected until it finishes; `wait()` for them."""

    def __init__(self, ids: list[int], *, max_tokens: int = 10) -> None:
        self.tokens: list[int] = []
        self.finished = threading.Event()
        params = GenerationParams(SamplingParams(temperature=0.0), max_tokens=max_tokens)
        self.request = Request(prompt_ids=list(ids), params=params, emit=self._emit)

    def _emit(self, event) -> None:
        if event.token is not None:
            self.tokens.append(event.token)
        if event.finish_reason is not None:
            self.finished.set()

    def wait(self, timeout: float = 60) -> list[int]:
        assert self.finished.wait(timeout), "the request did not finish"
        return self.tokens


def assert_gguf_matches(gguf_file, folder, *, rounded: bool, window_kept: bool = True) -> None:
    """The converter's file, dequantized to fp32, against transformers on the folder;
    `rounded` (F16, Q8_0): against transformers on the file's own weights, put back
    through our model's state dict (HF names). `window_kept` False: the converter wrote
    no sliding window (llama.cpp runs the file without one), so transformers runs without."""
    theirs = hf_model(folder)
    ours = loader.load(gguf_file, dtype=torch.float32).model
    if rounded:
        theirs.load_state_dict(hf_names(ours))
    if not window_kept:
        theirs.config.sliding_window = None
    assert_logits_match(ours, theirs)
    assert greedy(ours, PROMPT, 16) == hf_greedy(theirs, PROMPT, 16)


def assert_stored_matches(gguf_file) -> None:
    """The default load of a GGUF (its matrices kept as stored, prepared) against the same
    file dequantized: F32/F16 exactly, Q8_0 within the int8 rounding of its activations
    (random weights have near ties, so correlation rather than ids)."""
    prepared = loader.load(gguf_file, prepare=True).model
    exact = loader.load(gguf_file, dtype=torch.float32).model
    seq = tokens(1, 24, seed=5)
    with torch.no_grad():
        got, expected = prepared(seq, positions(0, 24)), exact(seq, positions(0, 24))
    correlation = torch.corrcoef(torch.stack([got.ravel(), expected.ravel()]))[0, 1]
    assert correlation > 0.999


def assert_int8_close(folder) -> None:
    """Prepared with int8 weights: within the rounding of fp32 (a wrong layout of the fused
    q/k/v or a missing norm falls far below)."""
    reference = loader.load(folder).model
    prepared = loader.load(folder, prepare=True, quantize="int8").model
    seq = tokens(1, 24, seed=3)
    with torch.no_grad():
        got, expected = prepared(seq, positions(0, 24)), reference(seq, positions(0, 24))
    assert torch.corrcoef(torch.stack([got.ravel(), expected.ravel()]))[0, 1] > 0.999


def assert_counted_and_native(folder) -> None:
    model = loader.load(folder).model
    assert card.count_parameters(read_config(folder)) == sum(p.numel() for p in model.parameters())
    assert card.describe(folder).native
