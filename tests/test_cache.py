"""The KV cache that grows with use (models/cache.py): logits through a growing cache equal
those through one reserved at the whole window (one row, several rows at different
positions, row views made before the parent grew, across block boundaries); the memory
held follows the tokens; trimming keeps what it is asked to keep; a reserved cache, which
a compiled decode step needs, never changes shape."""

import pytest
import torch

from checkpoints import make_gpt2, make_llama
from pocketlm.generate.compiled import CompiledDecode
from pocketlm.generate.sequence import Sequence
from pocketlm.models import cache as cache_module
from pocketlm.models import make_cache
from pocketlm.weights import loader

WINDOW = 600


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt2":
        make_gpt2(folder, n_positions=WINDOW, with_tokenizer=False)
    else:  # grouped-query attention: 4 query heads read 2 key/value heads
        make_llama(folder, max_position_embeddings=WINDOW)
    return loader.load(folder).model


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 8 slots, so that a few dozen tokens cross several boundaries."""
    monkeypatch.setattr(cache_module, "BLOCK", 8)


def _ids(n, seed=0):
    return torch.randint(0, 50257, (1, n), generator=torch.Generator().manual_seed(seed))


def _positions(start, n):
    return torch.arange(start, start + n)[None]  # (1, T)


def _prefill_then_decode(model, cache, tokens, prefill):
    """Logits (T, V) of a prefill of `prefill` tokens then one decode step per token."""
    with torch.inference_mode():
        out = [model(tokens[:, :prefill], _positions(0, prefill), cache)[0]]
        for i in range(prefill, tokens.shape[1]):
            out.append(model(tokens[:, i : i + 1], _positions(i, 1), cache)[0])
    return torch.cat(out)


@pytest.mark.parametrize(("n", "prefill", "blocks"), [(300, 250, None), (40, 5, 8)])
def test_one_row_growing_gives_the_reserved_logits(model, n, prefill, blocks, monkeypatch):
    """Across the 256-slot boundary with the real block, and across four 8-slot ones."""
    if blocks:
        monkeypatch.setattr(cache_module, "BLOCK", blocks)
    tokens = _ids(n)
    reserved = make_cache(model, batch_size=1, max_seq_len=WINDOW, reserve=True)
    growing = make_cache(model, batch_size=1, max_seq_len=WINDOW)
    expected = _prefill_then_decode(model, reserved, tokens, prefill)
    got = _prefill_then_decode(model, growing, tokens, prefill)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    block = cache_module.BLOCK
    assert growing.slots == -(-n // block) * block < WINDOW
    assert reserved.slots == WINDOW


def _server_run(model, cache):
    """What the server does: prefill requests one by one through row views (one made
    before the parent grew), then decode the rows together at their own positions; a row
    joins later and one is copied into a hole. Returns every step's logits (B, V)."""
    prompts = [_ids(11, seed=1), _ids(3, seed=2), _ids(6, seed=3)]
    late_view = cache.row(2)  # made now, written after rows 0 and 1 have grown the cache
    out = []
    with torch.inference_mode():
        for row, prompt in enumerate(prompts[:2]):
            view = cache.row(row)
            out.append(model(prompt, _positions(0, prompt.shape[1]), view)[:, -1])
        positions = torch.tensor([[11], [3]])  # (B, 1)
        for step in range(14):  # row 0 crosses slots 16 and 24 (blocks of 8)
            tokens = _ids(2, seed=10 + step).T  # (B, 1)
            out.append(model(tokens, positions + step, cache)[:, -1])
        out.append(model(prompts[2], _positions(0, 6), late_view)[:, -1])
        cache.copy_row(2, 1, 6)  # row 1 finished: row 2 moves into its hole
        positions = torch.tensor([[25], [6]])
        for step in range(10):
            tokens = _ids(2, seed=30 + step).T  # (B, 1)
            out.append(model(tokens, positions + step, cache)[:, -1])
    return out


def test_rows_at_different_positions_give_the_reserved_logits(model, small_blocks):
    reserved = make_cache(model, batch_size=4, max_seq_len=WINDOW, reserve=True)
    growing = make_cache(model, batch_size=4, max_seq_len=WINDOW)
    for got, expected in zip(
        _server_run(model, growing), _server_run(model, reserved), strict=True
    ):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (growing.rows, growing.slots) == (4, 40)  # rows: powers of two; slots: 35 -> 40


def test_a_row_view_writes_into_the_parent_as_it_is_now(small_blocks):
    cache = cache_module.KVCache(n_layers=1, batch_size=4, max_seq_len=64, n_kv_heads=1, head_dim=2)
    view = cache.row(3)
    ones = torch.ones(1, 1, 1, 2)  # (B, H, T, D)
    cache.update(0, _positions(20, 1), ones, ones)  # the parent grows: 2 rows x 24 slots
    view.update(0, _positions(30, 1), 2 * ones, 3 * ones)  # ... and again, through the view
    assert (cache.rows, cache.slots) == (4, 32)
    assert cache.k[0][0, 0, 20].tolist() == [1, 1]
    assert cache.k[0][3, 0, 30].tolist() == [2, 2] and cache.v[0][3, 0, 30].tolist() == [3, 3]
    assert view.k[0].shape == (1, 1, 32, 2)


def test_memory_follows_the_tokens_not_the_window(model):
    seq = Sequence(model, max_seq_len=WINDOW)
    assert seq.cache.nbytes == 0
    seq.prefill(_ids(300)[0].tolist())
    c = model.config
    per_slot = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4  # K and V, fp32
    assert seq.cache.slots == 512  # ceil(300 / 256) blocks
    assert seq.cache.nbytes == 512 * per_slot
    for token in range(5):
        seq.step(token)
    assert seq.cache.nbytes == 512 * per_slot


def test_a_decode_step_within_capacity_allocates_no_storage(model):
    cache = make_cache(model, batch_size=1, max_seq_len=WINDOW)
    tokens = _ids(200)
    _prefill_then_decode(model, cache, tokens[:, :10], 9)
    storage = [t.data_ptr() for t in (*cache.k, *cache.v)]
    _prefill_then_decode(model, cache, tokens, 10)  # up to slot 199, inside the first block
    assert [t.data_ptr() for t in (*cache.k, *cache.v)] == storage


def test_trim_keeps_the_rows_and_slots_asked_for(small_blocks):
    cache = cache_module.KVCache(n_layers=2, batch_size=8, max_seq_len=64, n_kv_heads=2, head_dim=3)
    values = torch.randn(4, 2, 40, 3)  # (B, H, T, D)
    positions = torch.arange(40).expand(4, 40)  # (B, T)
    for layer in range(2):
        cache.update(layer, positions, values + layer, -values)
    assert (cache.rows, cache.slots) == (4, 40)
    held = cache.nbytes
    cache.trim(2, 20)
    assert (cache.rows, cache.slots) == (2, 24)
    assert cache.nbytes == held * 2 * 24 // (4 * 40)
    for layer in range(2):
        torch.testing.assert_close(cache.k[layer][:, :, :20], values[:2, :, :20] + layer)
        torch.testing.assert_close(cache.v[layer][:, :, :20], -values[:2, :, :20])
    cache.trim(3, 30)  # never grows
    assert (cache.rows, cache.slots) == (2, 24)
    cache.trim(0, 0)
    assert cache.nbytes == 0 and (cache.rows, cache.slots) == (0, 0)
    cache.update(0, positions[:1, :5], values[:1, :, :5], values[:1, :, :5])  # grows again
    assert (cache.rows, cache.slots) == (2, 8)


def test_writes_past_the_limits_are_refused():
    cache = cache_module.KVCache(n_layers=1, batch_size=2, max_seq_len=16, n_kv_heads=1, head_dim=2)
    ones = torch.ones(1, 1, 1, 2)
    cache.update(0, _positions(15, 1), ones, ones)
    assert cache.slots == 16  # a block past the limit is cut to it
    with pytest.raises(ValueError, match="exceed"):
        cache.update(0, _positions(16, 1), ones, ones)
    with pytest.raises(ValueError, match="exceed"):
        cache.row(2).update(0, _positions(0, 1), ones, ones)


def test_a_reserved_cache_never_changes_shape(model):
    cache = make_cache(model, batch_size=1, max_seq_len=WINDOW, reserve=True)
    storage = [(t.data_ptr(), t.shape) for t in (*cache.k, *cache.v)]
    assert cache.reserved and (cache.rows, cache.slots) == (1, WINDOW)
    _prefill_then_decode(model, cache, _ids(WINDOW), WINDOW - 40)
    cache.trim(0, 0)  # kept: a compiled step reads this storage
    assert [(t.data_ptr(), t.shape) for t in (*cache.k, *cache.v)] == storage
    with pytest.raises(ValueError):
        cache.ensure(1, WINDOW + 1)


def test_a_compiled_sequence_reserves_its_window(model):
    """The compiled step is specialised to the cache's shape and skips its guards once
    warm, so a sequence decoding through it reserves its window up front; a growing cache,
    or one of another window, is refused."""
    step = CompiledDecode(model)  # compiles lazily, at the first call: not here
    seq = Sequence(model, max_seq_len=WINDOW, decode=step)
    assert seq.cache.reserved and seq.cache.slots == WINDOW
    assert not Sequence(model, max_seq_len=WINDOW).cache.reserved
    tokens, positions = torch.zeros((1, 1), dtype=torch.long), torch.zeros((1, 1), dtype=torch.long)
    with pytest.raises(ValueError, match="reserved"):
        step(tokens, positions, make_cache(model, batch_size=1, max_seq_len=WINDOW), 1)
    step(tokens, positions, seq.cache, 1)  # one slot: eager, but it fixes the shape
    other = Sequence(model, max_seq_len=WINDOW // 2, decode=step)
    with pytest.raises(ValueError, match="caches of"):
        step(tokens, positions, other.cache, 1)
