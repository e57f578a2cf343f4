"""The embedded default model, for real: SmolLM2-135M-Instruct (Q4_1 GGUF) through
pocketlm against `transformers` loading the very same file (`gguf_file=`), which
dequantizes it independently of our code."""

import pytest
import torch

import pocketlm

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhat is the largest planet in the solar system?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def ours(smollm2_lm):
    return smollm2_lm


@pytest.fixture(scope="module")
def theirs(smollm2_transformers):
    return smollm2_transformers


def test_logits_match_transformers_on_the_same_gguf(ours, theirs):
    ids = torch.tensor([ours.tokenizer.encode(PROMPTS[2] + " " + PROMPTS[1])])
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours.model(ids, positions)
    # Both dequantize Q4_1/Q8_0 to fp32 exactly; what differs is summation order.
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_32_greedy_tokens_identical_to_transformers(ours, theirs, prompt):
    ids = ours.tokenizer.encode(prompt)
    with torch.no_grad():
        # An explicit mask: else transformers masks every id equal to pad_token_id, and
        # SmolLM2's pad id (2) is <|im_end|>, which chat prompts contain.
        expected = theirs.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
        )[0, len(ids) :].tolist()
    got = ours.generate(ids, max_tokens=32, temperature=0).tokens
    # Ours stops at an end-of-turn token; compare up to there.
    assert got == expected[: len(got)]
    assert len(got) == 32 or expected[len(got)] in ours.tokenizer.eos_ids


def test_the_default_model_knows_the_capital_of_france():
    lm = pocketlm.load()  # no name: the embedded default
    out = lm.generate("The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in out.text
