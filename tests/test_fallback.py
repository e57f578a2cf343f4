"""An architecture without a native module (GPT-J) runs through `transformers` behind the
same API; without `transformers`, a clear error names the architecture."""

import sys

import pytest
import torch

import pocketlm
from checkpoints import make_gptj
from pocketlm.errors import PocketLMError
from pocketlm.weights.card import describe


@pytest.fixture(scope="module")
def gptj(tmp_path_factory):
    return make_gptj(tmp_path_factory.mktemp("gptj"))


def test_gptj_generates_what_transformers_generates(gptj):
    from transformers import AutoModelForCausalLM

    lm = pocketlm.load(str(gptj))
    assert lm.native is False
    prompt = lm.tokenizer.encode("Falcons fly")
    with torch.no_grad():
        expected = (
            AutoModelForCausalLM.from_pretrained(gptj)
            .eval()
            .generate(
                torch.tensor([prompt]),
                max_new_tokens=20,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :]
            .tolist()
        )
    assert lm.generate(prompt, max_tokens=20, temperature=0).tokens == expected
    # A second call that extends the first reuses (and crops) transformers' cache correctly.
    longer = prompt + expected[:5]
    assert lm.generate(longer, max_tokens=10, temperature=0).tokens == expected[5:15]


def test_show_says_it_runs_through_transformers(gptj):
    assert describe(gptj).native is False


def test_without_transformers_the_error_names_the_architecture(gptj, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(
        PocketLMError, match="no native module for architecture 'gptj'.*install transformers"
    ):
        pocketlm.load(str(gptj))
