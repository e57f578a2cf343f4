"""The catalogue's instruct models of the 2026 families (`pocketlm models`): each entry made
from config.json shape values has the parameter count transformers' own model class gives
for that config (built on the meta device), and its table columns are those values."""

import pytest

from pocketlm.cli.main import main
from pocketlm.weights import catalog

FROM_CONFIG = [e for e in catalog.entries() if e.config]


def transformers_parameters(config: dict) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors once


def test_the_families_are_listed_by_hub_id():
    repos = {e.repo_id for e in FROM_CONFIG}
    for repo in ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-30B-A3B", "meta-llama/Llama-3.1-8B-Instruct",
                 "ibm-granite/granite-3.3-2b-instruct", "tiiuae/Falcon3-7B-Instruct",
                 "mistralai/Mixtral-8x7B-Instruct-v0.1"):  # fmt: skip
        assert repo in repos
        assert catalog.lookup(repo).repo_id == repo


@pytest.mark.parametrize("entry", FROM_CONFIG, ids=lambda e: e.name)
def test_parameters_match_transformers(entry):
    config = dict(entry.config)
    assert entry.parameters == transformers_parameters(config)
    assert (entry.layers, entry.heads, entry.kv_heads, entry.width, entry.context, entry.vocab) == (
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["hidden_size"],
        config["max_position_embeddings"],
        config["vocab_size"],
    )


def test_models_command_lists_them(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for entry in FROM_CONFIG:
        assert f"hf:{entry.repo_id}" in out
    assert "qwen3-30b-a3b" in out and "30B-A3B" in out
