"""The server's prompt cache shared across requests (serve/prefix_cache.py): requests give
the same tokens with it on and off (greedy and seeded, batched, on sliding-window models
and across LongRoPE's switch), a chat's second turn reuses the first turn's prompt and
answer, least recently used blocks go first under a small budget, and the counters say
what happened. The reference for every output is the same scheduler with the cache off
(itself checked against transformers in test_serve_scheduler and the family tests)."""

import argparse

import pytest
import torch

import pocketlm
from checkpoints import make_llama
from pocketlm.cli.serve import ram_size
from pocketlm.models.cache import KVCache
from pocketlm.sampling import SamplingParams
from pocketlm.serve.prefix_cache import BLOCK, PrefixCache
from pocketlm.serve.scheduler import Scheduler
from test_serve_scheduler import Run

SWITCH = 88  # the LongRoPE model's original_max_position_embeddings
CASES = {
    # Mistral-style: one sliding window (8) on every layer.
    "mistral": dict(model_type="mistral", sliding_window=8),
    # Gemma 2: windowed and full layers alternating, soft caps.
    "gemma2": dict(model_type="gemma2", hidden_size=72, num_attention_heads=9,
                   num_key_value_heads=3, head_dim=12, sliding_window=8,
                   query_pre_attn_scalar=20, attn_logit_softcapping=5.0,
                   final_logit_softcapping=5.0, initializer_range=0.08),
    # Phi-3: LongRoPE with a switch at 88 tokens, and a window.
    "phi3": dict(model_type="phi3", original_max_position_embeddings=SWITCH, sliding_window=16,
                 pad_token_id=0, rope_parameters=dict(
                     rope_type="longrope", rope_theta=10000.0,
                     short_factor=[1.0 + 0.05 * i for i in range(8)],
                     long_factor=[1.0 + 0.7 * i for i in range(8)])),
}  # fmt: skip

SYSTEM = [(7 * i + 3) % 5000 + 100 for i in range(80)]  # an 80-token shared "system prompt"
PROMPTS = [SYSTEM + [11, 12, 13], SYSTEM + [21, 22], SYSTEM[:40] + [31] * 9, SYSTEM + [41] * 5]


@pytest.fixture(scope="module", params=list(CASES))
def lm(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return pocketlm.load(make_llama(folder, **CASES[request.param]))


def serve(lm, batches, *, cache_ram, max_tokens=8, **options):
    """Each batch of prompts submitted at once, one batch after the other, on a fresh
    scheduler; the tokens of every request, and the scheduler's counters."""
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=3, max_queue=16, cache_ram=cache_ram)
    scheduler.start()
    try:
        tokens = []
        for batch in batches:
            runs = [Run(ids, max_tokens=max_tokens, **options) for ids in batch]
            scheduler.submit([r.request for r in runs])
            tokens += [r.wait().tokens for r in runs]
        return tokens, scheduler.snapshot()
    finally:
        scheduler.stop()


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_k=40, seed=7)],
    ids=["greedy", "seeded"],
)
def test_outputs_equal_with_the_cache_on_and_off(lm, params):
    """Four requests at once in three rows (one waits), then a prompt cached whole and
    one longer than the LongRoPE switch: the same tokens whether or not the prefix comes
    from the cache, and the counters say how much did."""
    long = SYSTEM + PROMPTS[0] + [5]  # 164 tokens: past the Phi-3 model's switch
    batches = [PROMPTS, [PROMPTS[1], long]]
    off, counts = serve(lm, batches, cache_ram=0, params=params)
    assert "prefix_cache_hits" not in counts  # off: no counters either
    on, counts = serve(lm, batches, cache_ram=1 << 20, params=params)
    assert on == off
    # The first prompt misses; the other three of the first batch reuse the whole blocks
    # they share with it (80, 32, 80 tokens); then PROMPTS[1], held whole (its tail too),
    # all but its last token (81), and the long prompt the 80 of SYSTEM -- except past
    # the LongRoPE switch, where it misses.
    longrope = lm.model.config.rope_switch_length is not None
    assert counts["prefix_cache_misses"] == 1 + longrope
    assert counts["prefix_cache_hits"] == 5 - longrope
    assert counts["prefix_cache_reused_tokens"] == 80 + 32 + 80 + 81 + (0 if longrope else 80)
    assert counts["prefix_cache_bytes"] % (_block_bytes(lm) // BLOCK) == 0  # partial tails
    assert (
        counts["prompt_tokens"]
        == sum(map(len, [*PROMPTS, *batches[1]])) - counts["prefix_cache_reused_tokens"]
    )


def test_a_chats_second_turn_reuses_the_first_turn_and_its_answer(lm):
    """Turn two resends turn one's prompt and the answer it got: both come from the cache
    (stored when the first request ended), and the answer is what it is without it."""
    first = SYSTEM[:40]
    greedy = SamplingParams(temperature=0.0)
    (answer,), _ = serve(lm, [[first]], cache_ram=0, max_tokens=12, params=greedy)
    second = first + answer + list(range(50, 86))  # 88 tokens: within the Phi-3 switch
    batches = [[first], [second]]
    off, _ = serve(lm, batches, cache_ram=0, max_tokens=12, params=greedy)
    on, counts = serve(lm, batches, cache_ram=1 << 20, max_tokens=12, params=greedy)
    assert on == off and on[0] == answer
    held = len(first) + len(answer) - 1  # the answer's last token was never computed
    assert counts["prefix_cache_hits"] == 1
    assert counts["prefix_cache_reused_tokens"] == held // BLOCK * BLOCK > len(first)


def test_a_small_budget_evicts_and_the_outputs_stay_the_same(lm):
    """Room for 4 blocks: each request's blocks push older ones out, never past the
    budget, and every request still gets the tokens it gets with the cache off."""
    greedy = SamplingParams(temperature=0.0)
    off, _ = serve(lm, [PROMPTS, PROMPTS[::-1]], cache_ram=0, params=greedy)
    budget = 4 * _block_bytes(lm)
    on, counts = serve(lm, [PROMPTS, PROMPTS[::-1]], cache_ram=budget, params=greedy)
    assert on == off
    assert counts["prefix_cache_evicted_blocks"] > 0 and counts["prefix_cache_hits"] > 0
    assert counts["prefix_cache_bytes"] <= budget


def test_prompt_logprobs_are_computed_whole(lm):
    """A request for the prompt's log-probabilities needs every position's logits: it
    bypasses the cache (neither hit nor miss) and gets the same numbers."""
    got = []
    for cache_ram in (0, 1 << 20):
        scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=2, cache_ram=cache_ram)
        scheduler.start()
        try:
            first = Run(PROMPTS[0], max_tokens=2, params=SamplingParams(temperature=0.0)).request
            scheduler.submit([first])
            run = Run(PROMPTS[1], max_tokens=2, params=SamplingParams(temperature=0.0),
                      prompt_logprobs=True)  # fmt: skip
            scheduler.submit([run.request])
            got.append((run.wait().events[0].prompt_logprobs, run.tokens))
            counts = scheduler.snapshot()
        finally:
            scheduler.stop()
    assert got[0] == got[1] and len(got[0][0]) == len(PROMPTS[1])
    assert counts["prefix_cache_hits"] == 0 and counts["prefix_cache_misses"] == 1


def _block_bytes(lm):
    c = lm.model.config
    return 2 * c.num_layers * c.num_kv_heads * BLOCK * c.head_dim * 4  # fp32


def _cache(rows=4, slots=128):
    cache = KVCache(n_layers=2, batch_size=rows, max_seq_len=slots, n_kv_heads=2, head_dim=4)
    cache.ensure(rows, slots)
    torch.manual_seed(0)
    for t in (*cache.k, *cache.v):
        t.normal_()
    return cache


def test_blocks_round_trip_into_another_row():
    """A held prefix lands in another row slot for slot: whole blocks and the tail (a
    partial block) are held, and all of them but the prompt's last token (computed for its
    logits) reused; a partial block only serves a prompt that ends where it does."""
    cache, prefix = _cache(), PrefixCache(budget=1 << 20)
    ids = list(range(100, 170))  # 70 tokens: 4 whole blocks and a tail of 6
    prefix.store(ids, cache, 0)
    assert prefix.stats()["prefix_cache_blocks"] == 5
    assert prefix.stats()["prefix_cache_bytes"] == 70 * 2 * 2 * 2 * 4 * 4
    assert prefix.load(ids[:66] + [1], cache, 2) == 64  # another tail: whole blocks only
    assert prefix.load(ids[:64], cache, 3) == 63  # the 64th token is the prompt's last
    assert prefix.load(ids, cache, 1) == 69  # held whole, its tail too
    for t in (*cache.k, *cache.v):
        assert torch.equal(t[2, :, :64], t[0, :, :64]) and torch.equal(t[3, :, :63], t[0, :, :63])
        assert not torch.equal(t[3, :, 63], t[0, :, 63])
        assert torch.equal(t[1, :, :69], t[0, :, :69])
    assert prefix.load([5] + ids, cache, 1) == 0  # a block's key is its whole prefix
    stats = prefix.stats()
    assert (stats["prefix_cache_hits"], stats["prefix_cache_misses"]) == (3, 1)
    assert stats["prefix_cache_reused_tokens"] == 64 + 63 + 69


def test_least_recently_used_leaves_are_evicted_under_the_budget():
    cache = _cache()
    block_bytes = 2 * 2 * 2 * BLOCK * 4 * 4  # (k and v) x layers x heads x BLOCK x D x fp32
    prefix = PrefixCache(budget=3 * block_bytes)
    a, b, c = list(range(32)), list(range(50, 82)), list(range(200, 232))
    prefix.store(a, cache, 0)  # a1 a2
    prefix.store(b, cache, 1)  # b1 b2: one block must go, the least recent leaf a2
    assert prefix.stats()["prefix_cache_evicted_blocks"] == 1
    assert prefix.load(a + [0], cache, 2) == 16  # a1 is still held (and now the most recent)
    assert prefix.load(b + [0], cache, 2) == 32
    prefix.store(c, cache, 3)  # c1 c2: two must go
    stats = prefix.stats()
    assert stats["prefix_cache_bytes"] == 3 * block_bytes and stats["prefix_cache_blocks"] == 3
    assert prefix.load(c + [0], cache, 2) == 32
    # a1 was used before b's blocks, so it went first, then b's leaf b2; b1 stays
    assert prefix.load(a + [0], cache, 2) == 0
    assert prefix.load(b + [0], cache, 2) == 16
    # A tail is a leaf, more recent than nothing before it: making room for d's 26 tokens
    # drops c's tail first, then c2 (a block with a tail after it is no leaf until then).
    c_tail = c + [7, 8, 9]
    prefix.store(c_tail, cache, 3)  # c's tail (3 tokens): b1 goes to make room
    assert prefix.load(c_tail, cache, 2) == len(c_tail) - 1
    prefix.store(list(range(400, 426)), cache, 0)  # c's tail goes, then c2
    assert prefix.load(c_tail, cache, 2) == 16
    assert prefix.stats()["prefix_cache_bytes"] <= 3 * block_bytes
    # A prefix longer than the whole budget keeps what fits of it, from its start.
    prefix.store(list(range(300, 380)), cache, 0)
    assert prefix.stats()["prefix_cache_blocks"] == 3
    assert prefix.load(list(range(300, 380)) + [0], cache, 2) == 48


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MB", 512 << 20), ("2GB", 2 << 30), ("1.5G", 3 << 29), ("300", 300 << 20), ("0", 0),
     ("64MiB", 64 << 20)],
)  # fmt: skip
def test_cache_ram_sizes(text, size):
    assert ram_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1GB", "", "512B"])
def test_bad_cache_ram_is_one_line(text):
    with pytest.raises(argparse.ArgumentTypeError, match="size|negative"):
        ram_size(text)


def test_smollm2_gives_the_same_tokens_on_and_off(smollm2_lm):
    """The embedded model with its real tokenizer (dequantized to fp32, as the session's
    shared fixture loads it): a warm prompt gets the cold tokens, and log-probabilities
    within float32's rounding of a prefill split in two (a matmul's sums depend on how
    many rows it takes; docs/prefix_cache.md measures the as-stored kernels, where the
    split shows more)."""
    lm = smollm2_lm
    shared = lm.tokenizer.encode(
        "A ledger of the harbour's ships, kept by the harbour master. " * 8
    )
    prompts = [shared + lm.tokenizer.encode(q) for q in ("Who kept it?", "Which ships?")]
    got = []
    for cache_ram in (0, 1 << 26):
        scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=2, cache_ram=cache_ram)
        scheduler.start()
        try:
            runs = []
            for ids in prompts:  # one after the other: the second finds the first's blocks
                run = Run(ids, max_tokens=4, params=SamplingParams(temperature=0.0), logprobs=0)
                scheduler.submit([run.request])
                runs.append(run.wait())
            counts = scheduler.snapshot()
        finally:
            scheduler.stop()
        got.append([(r.tokens, [e.logprob for e in r.events if e.token is not None]) for r in runs])
    (off_a, off_b), (on_a, on_b) = got
    # (with the cache on, even a cold prompt's last token is computed in a call of its own)
    assert on_a[0] == off_a[0] and on_b[0] == off_b[0]
    assert on_a[1] == pytest.approx(off_a[1], abs=1e-4)
    assert on_b[1] == pytest.approx(off_b[1], abs=1e-4)
    assert counts["prefix_cache_reused_tokens"] == len(shared) // BLOCK * BLOCK


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        # SmolLM2's specials (0-2: endoftext, im_start, im_end) held off, so every seed
        # and thread count samples the 16 tokens the test compares
        SamplingParams(temperature=0.9, top_k=40, seed=3, logit_bias={0: -100, 1: -100, 2: -100}),
    ],
    ids=["greedy", "seeded"],
)
def test_smollm2_as_stored_repeats_a_request_exactly(smollm2_stored, params):
    """The default model as stored (Q4_1; its kernels round differently with the number of
    rows a product takes): the same request sent twice, the second held whole in the cache
    (its tail too), gets the very same tokens and log-probabilities -- the last prompt token
    is computed in a call of its own both times, on the KV the first run computed."""
    lm = smollm2_stored
    ids = lm.tokenizer.encode("The harbour master kept a ledger of ships. " * 3 + "The first ship")
    assert len(ids) % BLOCK  # a tail to hold as a partial block
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=2, cache_ram=1 << 26)
    scheduler.start()
    try:
        runs = []
        for _ in range(2):
            run = Run(ids, max_tokens=16, params=params, logprobs=0)
            scheduler.submit([run.request])
            runs.append(run.wait())
        counts = scheduler.snapshot()
    finally:
        scheduler.stop()
    first, second = ([(e.token, e.logprob) for e in r.events if e.token is not None] for r in runs)
    assert len(first) == 16 and second == first
    assert counts["prefix_cache_reused_tokens"] == len(ids) - 1
