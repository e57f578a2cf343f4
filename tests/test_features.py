"""Scores and features against `transformers` on the same weights: the perplexity
guide's sliding-window recipe run verbatim, log_softmax of its logits (every token, top-k),
`output_hidden_states` of every layer, and batched vs one-by-one embeddings; the four
subcommands end to end on real files; and per-token log-probs of the real SmolLM2 GGUF
against transformers loading that same GGUF."""

import html
import json
import math
import re

import numpy as np
import pytest
import torch

import pocketlm
from checkpoints import hf_model, make_gpt2, make_llama
from pocketlm.cli.main import main
from pocketlm.errors import PocketLMError
from pocketlm.features.hidden import embed

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "How vexingly quick daft zebras jump; the five boxing wizards jump quickly. Sphinx of "
    "black quartz, judge my vow. Jackdaws love my big sphinx of quartz, and a wizard's job "
    "is to vex chumps quickly in fog. The quick onyx goblin jumps over the lazy dwarf. "
    "Café, naïve, 東京: not everything is ASCII."
)  # 100 GPT-2 tokens: longer than the 64-token context of the GPT-2 below


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = make_gpt2(tmp_path_factory.mktemp("gpt2"), n_positions=64, n_layer=3)
    return pocketlm.load(folder, device="cpu"), hf_model(folder), folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = make_llama(tmp_path_factory.mktemp("llama"), max_position_embeddings=64)
    return pocketlm.load(folder, device="cpu"), hf_model(folder), folder


def hf_perplexity(model, ids, *, max_length, stride):
    """The transformers guide (docs/source/en/perplexity.md), as written there."""
    encodings = torch.tensor([ids])
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(input_ids, labels=target_ids).loss
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return torch.exp(nll_sum / n_tokens).item()


def hf_logprobs(model, ids):
    """log_softmax of transformers' logits: row i scores token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


# -- perplexity ---------------------------------------------------------------------------


@pytest.mark.parametrize("context, stride", [(64, 32), (64, 64), (48, 20), (64, 63)])
def test_perplexity_equals_the_transformers_recipe(gpt2, context, stride):
    lm, hf, _ = gpt2
    ids = lm.tokenizer.encode(TEXT)
    assert len(ids) > 64  # longer than the model's context: several windows
    expected = hf_perplexity(hf, ids, max_length=context, stride=stride)
    result = lm.perplexity(TEXT, context=context, stride=stride)
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
    assert result.windows > 1 and result.tokens == len(ids)


def test_perplexity_defaults_and_llama(llama):
    lm, hf, folder = llama
    ids = lm.tokenizer.encode(TEXT)
    seen = []
    result = lm.perplexity(ids, progress=lambda done, total: seen.append((done, total)))
    assert (result.context, result.stride) == (64, 32)  # the model's context, half of it
    assert result.perplexity == pytest.approx(
        hf_perplexity(hf, ids, max_length=64, stride=32), rel=1e-4
    )
    assert seen == [(i, result.windows) for i in range(result.windows + 1)]
    small = pocketlm.load(folder, device="cpu", context=24)  # a smaller window, as loaded
    result = small.perplexity(ids)
    assert (result.context, result.stride) == (24, 12)
    expected = hf_perplexity(hf, ids, max_length=24, stride=12)
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
    scores = small.score(ids[:40])  # windows of 24, 12 apart: token 30 sees ids[12:30]
    want = hf_logprobs(hf, ids[12:36])[30 - 1 - 12, ids[30]].item()
    assert scores[30].logprob == pytest.approx(want, abs=1e-4)


def test_perplexity_refuses_bad_windows(gpt2):
    lm, _, _ = gpt2
    with pytest.raises(PocketLMError, match="context must be between 2 and .* 64"):
        lm.perplexity(TEXT, context=65)
    with pytest.raises(PocketLMError, match="stride must be between 1 and the context 32"):
        lm.perplexity(TEXT, context=32, stride=33)
    with pytest.raises(PocketLMError, match="at least 2"):
        lm.perplexity("Hello")  # one token: nothing to predict
    with pytest.raises(PocketLMError, match="empty"):
        lm.perplexity("")


# -- token log-probabilities --------------------------------------------------------------


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_every_token_logprob_and_top_k_equal_transformers(which, request):
    lm, hf, _ = request.getfixturevalue(which)
    ids = lm.tokenizer.encode(TEXT)[:60]
    expected = hf_logprobs(hf, ids)
    scores = lm.score(ids, top_k=5)
    assert [s.token for s in scores] == ids
    assert scores[0].logprob is None and scores[0].top == []
    got = torch.tensor([s.logprob for s in scores[1:]])
    want = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    for i, s in enumerate(scores[1:]):
        values, top_ids = expected[i].topk(5)
        assert [t for t, _ in s.top] == top_ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in s.top]), values, atol=1e-4, rtol=0)
        assert [v for _, v in s.top] == sorted((v for _, v in s.top), reverse=True)


def test_text_longer_than_the_context_is_scored_in_windows(gpt2):
    lm, hf, _ = gpt2
    ids = lm.tokenizer.encode(TEXT)
    scores = lm.score(ids)
    assert len(scores) == len(ids) > 64
    # Windows of 64 every 32 tokens: token j >= 64 is scored by the window starting at
    # 32 * ((j - 32) // 32), which sees at least the 32 tokens before it.
    assert len(ids) > 96
    for j in (63, 64, 80, 95, 96, len(ids) - 1):
        begin = 0 if j < 64 else 32 * ((j - 32) // 32)
        window = ids[begin : begin + 64]
        assert scores[j].logprob == pytest.approx(
            hf_logprobs(hf, window)[j - 1 - begin, ids[j]].item(), abs=1e-4
        )


def test_generate_with_logprobs_carries_top_alternatives(gpt2):
    lm, hf, _ = gpt2
    out = lm.generate("The quick brown", max_tokens=5, temperature=0, logprobs=3)
    prompt = lm.tokenizer.encode("The quick brown")
    assert len(out.top_logprobs) == len(out.tokens) == 5
    expected = hf_logprobs(hf, prompt + out.tokens)
    for i, (token, top) in enumerate(zip(out.tokens, out.top_logprobs, strict=True)):
        values, top_ids = expected[len(prompt) - 1 + i].topk(3)
        assert [t.token for t in top] == top_ids.tolist() and top[0].token == token  # greedy
        assert [t.text for t in top] == [lm.tokenizer.decode([t]) for t in top_ids.tolist()]
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in top]), values, atol=1e-4, rtol=0
        )
    assert lm.generate("The quick brown", max_tokens=2, temperature=0).top_logprobs == []


# -- hidden states and embeddings ---------------------------------------------------------


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_hidden_states_of_every_layer_equal_output_hidden_states(which, request):
    lm, hf, _ = request.getfixturevalue(which)
    ids = lm.tokenizer.encode(TEXT)[:40]
    with torch.no_grad():
        expected = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    n = len(expected)
    assert n == lm.model.config.num_layers + 1
    for layer in [*range(n), -1, -n]:
        got = embed(lm.model, [ids], layer=layer, pool="none")
        assert got.layer == layer % n
        torch.testing.assert_close(got.vectors[0], expected[layer][0], atol=1e-5, rtol=1e-5)


def test_batched_embeddings_equal_one_by_one(llama):
    lm, hf, _ = llama
    texts = [
        "Hi",
        "The quick brown fox jumps over the lazy dog.",
        "Pack my box",
        TEXT[:120],
        "a b c d",
    ]
    for pool in ("mean", "last", "none"):
        batched = lm.embed(texts, layer=1, pool=pool, batch_size=3)
        for text, vector in zip(texts, batched.vectors, strict=True):
            alone = lm.embed(text, layer=1, pool=pool).vectors[0]
            torch.testing.assert_close(vector, alone, atol=1e-5, rtol=1e-5)
    # Mean pooling is over the real tokens only, as the oracle's hidden states say.
    ids = lm.tokenizer.encode(texts[1])
    with torch.no_grad():
        states = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    got = lm.embed(texts, pool="mean", batch_size=5).vectors[1]
    torch.testing.assert_close(got, states.mean(0), atol=1e-5, rtol=1e-5)
    last = lm.embed(texts, pool="last", normalize=True).vectors[1]
    torch.testing.assert_close(last, states[-1] / states[-1].norm(), atol=1e-5, rtol=1e-5)


def test_embedding_errors(gpt2):
    lm, _, _ = gpt2
    with pytest.raises(PocketLMError, match=r"layer 4 is out of range: .* 0\.\.3 .* -4\.\.-1"):
        lm.embed("hello", layer=4)
    with pytest.raises(PocketLMError, match="layer -5 is out of range"):
        lm.embed("hello", layer=-5)
    with pytest.raises(PocketLMError, match="text 1 is empty"):
        lm.embed(["hello", ""])
    with pytest.raises(PocketLMError, match="unknown pool 'max'"):
        lm.embed("hello", pool="max")
    with pytest.raises(PocketLMError, match="input 0 is 100 tokens; the context window is 64"):
        embed(lm.model, [[11] * 100])


# -- the subcommands, on real files -------------------------------------------------------


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_perplexity_cli_json_and_text(gpt2, tmp_path, capsys):
    lm, hf, folder = gpt2
    file = tmp_path / "text.txt"
    file.write_text(TEXT, encoding="utf-8")
    code, out, err = run_cli(
        capsys, "perplexity", folder, file, "--context", 48, "--stride", 20, "--json"
    )
    assert code == 0
    result = json.loads(out)
    ids = lm.tokenizer.encode(TEXT)
    assert result["perplexity"] == pytest.approx(
        hf_perplexity(hf, ids, max_length=48, stride=20), rel=1e-4
    )
    assert (result["context"], result["stride"], result["tokens"]) == (48, 20, len(ids))
    assert "window" in err  # the progress bar
    code, out, _ = run_cli(capsys, "perplexity", folder, file)
    assert code == 0 and re.match(r"perplexity: \d+\.\d{4}\n", out)


def test_score_cli_json_and_table(gpt2, capsys):
    lm, hf, folder = gpt2
    code, out, _ = run_cli(capsys, "score", folder, "Hello world, café", "--top-k", 2, "--json")
    assert code == 0
    data = json.loads(out)
    ids = lm.tokenizer.encode("Hello world, café")
    expected = hf_logprobs(hf, ids)
    assert [t["id"] for t in data["tokens"]] == ids
    assert data["tokens"][0]["logprob"] is None
    assert "".join(t["text"] for t in data["tokens"]) == "Hello world, café"
    for i, token in enumerate(data["tokens"][1:]):
        assert token["logprob"] == pytest.approx(expected[i, ids[i + 1]].item(), abs=1e-4)
        assert [a["id"] for a in token["top"]] == expected[i].topk(2).indices.tolist()
    code, out, _ = run_cli(capsys, "score", folder, "Hello world")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:5] == ["#", "token", "id", "logprob", "prob"]
    assert lines[1].split()[:2] == ["0", "'Hello'"] and lines[2].split()[:3] == ["1", "'", "world'"]
    assert f"{expected[0, 995].item():.3f}" in lines[2]


def test_embed_cli_writes_npy_and_jsonl(gpt2, tmp_path, capsys):
    lm, _, folder = gpt2
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("first line\n\nsecond, longer line of text\n", encoding="utf-8")
    out = tmp_path / "vectors.npy"
    code, _, err = run_cli(
        capsys,
        "embed",
        folder,
        "a text",
        f"@{inputs}",
        "--layer",
        2,
        "--out",
        out,
        "--batch-size",
        2,
    )
    assert code == 0 and "wrote 3 embeddings of 64 (layer 2, pool mean)" in err
    expected = lm.embed(["a text", "first line", "second, longer line of text"], layer=2).vectors
    np.testing.assert_allclose(np.load(out), torch.stack(expected).numpy(), atol=1e-6)
    jsonl = tmp_path / "tokens.jsonl"
    code, _, _ = run_cli(
        capsys, "embed", folder, "a text", "more", "--pool", "none", "--normalize", "--out", jsonl
    )
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert code == 0 and [r["text"] for r in rows] == ["a text", "more"]
    vectors = np.array(rows[0]["embedding"])
    assert vectors.shape == (2, 64) and rows[0]["tokens"] == 2
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "inputs.txt",
        "tokens.jsonl",
        "vectors.npy",
    ]


def test_probs_cli_html_and_png(gpt2, tmp_path, capsys):
    lm, hf, folder = gpt2
    text = "Hello <world> & café\nnew line"
    page = tmp_path / "view.html"
    code, _, _ = run_cli(capsys, "probs", folder, text, "--out", page)
    assert code == 0
    spans = re.findall(
        r'<span style="background: (#[0-9a-f]{6})"( data-p="([^"]+)")? title="[^"]*">(.*?)</span>',
        page.read_text(encoding="utf-8"),
        re.S,
    )
    ids = lm.tokenizer.encode(text)
    assert len(spans) == len(ids)
    assert html.unescape("".join(s[3] for s in spans)) == text
    expected = hf_logprobs(hf, ids)
    for i, (_, _, p, _) in enumerate(spans[1:]):
        assert float(p) == pytest.approx(math.exp(expected[i, ids[i + 1]].item()), rel=1e-4)
    assert "http" not in page.read_text(encoding="utf-8")  # self-contained
    image = tmp_path / "view.png"
    code, _, _ = run_cli(capsys, "probs", folder, text, "--out", image)
    assert code == 0 and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = (matplotlib.image.imread(image)[..., :3] * 255).round().astype(int).reshape(-1, 3)
    from pocketlm.cli.probs import colour

    first = tuple(
        int(colour(math.exp(expected[0, ids[1]].item()))[k : k + 2], 16) for k in (1, 3, 5)
    )
    assert (np.abs(pixels - first).max(axis=1) <= 1).any()  # the second token's colour is drawn


def test_cli_bad_input_is_one_line_error(gpt2, tmp_path, capsys):
    _, _, folder = gpt2
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\xe9 au lait".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    cases = [
        (
            ["embed", folder, "hi", "--layer", 9, "--out", tmp_path / "x.npy"],
            "layer 9 is out of range",
        ),
        (["score", folder, ""], "the text is empty"),
        (["probs", folder, "", "--out", tmp_path / "x.html"], "the text is empty"),
        (["perplexity", folder, latin1], "latin1.txt is not UTF-8 text (byte 0xe9 at offset 3)"),
        (["embed", folder, f"@{latin1}", "--out", tmp_path / "x.npy"], "is not UTF-8 text"),
        (["perplexity", folder, tmp_path / "missing.txt"], "missing.txt: no such file"),
        (["embed", folder, "hi", "--out", tmp_path / "x.csv"], "--out must end in .npy or .jsonl"),
        (
            ["embed", folder, "a", "b", "--pool", "none", "--out", tmp_path / "x.npy"],
            "write them to a .jsonl",
        ),
        (["perplexity", folder, empty], "empty.txt is empty: there is no text to measure"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 1, argv
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob(".*.tmp"))


# -- the real model -----------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_logprobs_equal_transformers_on_the_same_gguf(smollm2_lm, smollm2_transformers):
    """transformers dequantizes the Q4_1 GGUF to fp32 as we do; the logprobs agree
    within 2e-4 nats (fp32 accumulation order; measured about 2e-5)."""
    hf, lm = smollm2_transformers, smollm2_lm
    text = "The capital of France is Paris. It is known for the Eiffel Tower and fine food."
    ids = lm.tokenizer.encode(text)
    assert ids[:6] == [504, 3575, 282, 4649, 314, 7042]  # sane: "The capital of France is Paris"
    expected = hf_logprobs(hf, ids)
    scores = lm.score(text, top_k=3)
    got = torch.tensor([s.logprob for s in scores[1:]])
    torch.testing.assert_close(
        got, expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])], atol=2e-4, rtol=0
    )
    assert [t for t, _ in scores[5].top] == expected[4].topk(3).indices.tolist()
    assert scores[5].top[0][0] == 7042  # " Paris" is the model's first choice
