"""The Hugging Face checkpoint reader against malformed files: a short run of the fuzzer
(benchmarks/fuzz_hf_loaders.py, 300 mutated checkpoints) and one regression test for each
escape it found. Every case must end in a one-line PocketLMError naming what is wrong (or
load and generate); before the fixes these raised TypeError, RuntimeError, OverflowError,
AttributeError, ValueError, RecursionError, hung, or read a file outside the model folder.

The full run is `python benchmarks/fuzz_hf_loaders.py --cases 20000`.
"""

import importlib.util
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import make_gpt2, make_llama
from pocketlm.errors import PocketLMError
from pocketlm.weights.loader import load

FUZZER = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_hf_loaders.py"


def load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_hf_loaders", FUZZER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_hf_reader(tmp_path):
    fuzzer = load_fuzzer()
    report = fuzzer.fuzz(cases=300, seed=0, folder=tmp_path, timeout=10.0)
    assert report.failures == [], report.summary()
    assert report.cases == 300
    # The mutations reach past the first checks: some checkpoints still load and generate,
    # and the errors come from many different checks (JSON, header, config, shapes, index).
    assert report.outcomes["ok"] > 0, report.summary()
    assert len(report.outcomes) > 15, report.summary()


def test_fuzzer_replays_a_case(tmp_path):
    fuzzer = load_fuzzer()
    seeds = fuzzer.make_seeds(tmp_path)
    first = fuzzer.mutate(seeds[1], fuzzer.random.Random("0:5"))
    assert fuzzer.mutate(seeds[1], fuzzer.random.Random("0:5")) == first


# -- regressions -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return make_gpt2(
        tmp_path_factory.mktemp("gpt2"), n_embd=32, n_layer=1, n_head=2, n_positions=32
    )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    return make_llama(folder, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def _variant(seed: Path, folder: Path, **config) -> Path:
    """A copy of the checkpoint `seed` whose config.json has `config` merged in (a value of
    ... removes the key)."""
    shutil.copytree(seed, folder)
    data = json.loads((folder / "config.json").read_text())
    data.update(config)
    data = {k: v for k, v in data.items() if v is not ...}
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def _one_line_error(path: Path, match: str) -> str:
    with pytest.raises(PocketLMError, match=match) as info:
        load(path)
    assert "\n" not in str(info.value)
    return str(info.value)


GPT2_CONFIGS = [
    # (config, the key the error must name); what escaped before, and from where
    ({"n_layer": 2**40}, "n_layer"),  # hung building 2**40 blocks on the meta device
    ({"n_inner": 2**63 - 1}, "n_inner"),  # RuntimeError: storage size overflowed
    ({"n_positions": -2}, "n_positions"),  # RuntimeError: negative dimension
    ({"n_embd": 64.0}, "n_embd"),  # TypeError in nn.Linear
    ({"n_head": 0}, "n_head"),  # ZeroDivisionError in GPT2Config
    ({"n_embd": "32"}, "n_embd"),  # TypeError: not all arguments converted
    ({"vocab_size": True}, "vocab_size"),  # a bool is not a size
    ({"activation_function": []}, "activation_function"),  # TypeError: unhashable
    ({"activation_function": "swish"}, "activation_function"),  # KeyError in MLP
    ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon"),  # loaded, then failed in forward
    ({"n_positions": 1}, "n_positions"),  # loaded, then ValueError in generate
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),  # a truthy string tied the head
]


@pytest.mark.parametrize(("config", "key"), GPT2_CONFIGS, ids=lambda v: str(v)[:40])
def test_bad_gpt2_config_names_the_key(gpt2_dir, tmp_path, config, key):
    message = _one_line_error(_variant(gpt2_dir, tmp_path / "m", **config), f"config {key} = ")
    assert "is not valid (expected" in message


LLAMA_CONFIGS = [
    ({"num_hidden_layers": 2**50}, "num_hidden_layers"),  # hang
    ({"max_position_embeddings": 2**50}, "max_position_embeddings"),
    ({"intermediate_size": 1.5}, "intermediate_size"),  # TypeError in nn.Linear
    ({"num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": ...},
     "head_dim (or hidden_size / num_attention_heads)"),  # a head size of 1 cannot rotate
    ({"num_key_value_heads": 3}, "num_key_value_heads"),  # GQA needs a divisor
    ({"head_dim": 2**40}, "head_dim"),  # the rotary table would take terabytes
    ({"rope_theta": 2**64}, "rope_theta"),  # OverflowError: int too big to convert
    ({"rope_theta": float("nan")}, "rope_theta"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling.factor"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor"),  # KeyError
    ({"rope_scaling": "linear"}, "rope_scaling"),  # AttributeError: str has no get
    ({"rope_parameters": 3}, "rope_parameters"),  # AttributeError: int has no get
    ({"rope_parameters": {"rope_theta": -1.0}}, "rope_parameters.rope_theta"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     "rope_scaling.low_freq_factor"),  # ZeroDivisionError in rope_inv_freq
    ({"rope_scaling": {"rope_type": 5}}, "rope_scaling.rope_type"),
    ({"attention_bias": 1}, "attention_bias"),
]  # fmt: skip


@pytest.mark.parametrize(("config", "key"), LLAMA_CONFIGS, ids=lambda v: str(v)[:40])
def test_bad_llama_config_names_the_key(llama_dir, tmp_path, config, key):
    folder = _variant(llama_dir, tmp_path / "m", **config)
    message = _one_line_error(folder, f"config {re.escape(key)} = ")
    assert "is not valid (expected" in message


def test_huge_numbers_and_deep_nesting_in_config_json(gpt2_dir, tmp_path):
    folder = _variant(gpt2_dir, tmp_path / "m")
    config = (folder / "config.json").read_text()
    # json.loads raises ValueError (not JSONDecodeError) past 4300 digits: it escaped.
    (folder / "config.json").write_text(config.replace("{", '{"x": 1' + "0" * 5000 + ",", 1))
    _one_line_error(folder, "config.json is not valid JSON")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)  # RecursionError
    _one_line_error(folder, "config.json is not valid JSON")
    (folder / "config.json").write_bytes(b'{"model_type": "gpt2\xc3\x28"}')
    _one_line_error(folder, "config.json is not valid JSON")
    for document in ("[]", '"gpt2"', "null", json.dumps({"n_embd": 32})):
        (folder / "config.json").write_text(document)
        _one_line_error(folder, "has no model_type")


def _sharded(llama_dir: Path, folder: Path, weight_map: object) -> Path:
    folder = _variant(llama_dir, folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_shard_index_of_the_wrong_shape(llama_dir, tmp_path):
    # AttributeError ('list' object has no attribute 'values') before.
    folder = _sharded(llama_dir, tmp_path / "a", ["model-00001-of-00001.safetensors"])
    _one_line_error(folder, "weight_map is not an object")
    folder = _sharded(llama_dir, tmp_path / "b", {"lm_head.weight": 5})
    _one_line_error(folder, "names shard 5, which is not a file name")
    folder = _sharded(
        llama_dir, tmp_path / "c", {"lm_head.weight": "model-00001-of-00001.safetensors"}
    )
    assert load(folder).model.config.hidden_size == 32  # the good index loads


@pytest.mark.parametrize("name", ["../elsewhere/model.safetensors", "/etc/passwd", "..", ""])
def test_shard_index_cannot_reach_outside_the_folder(llama_dir, tmp_path, name):
    # Before: the loader opened whatever path the index named.
    outside = _variant(llama_dir, tmp_path / "elsewhere")
    folder = _sharded(llama_dir, tmp_path / "m", {"lm_head.weight": name})
    assert (outside / "model.safetensors").is_file()
    _one_line_error(folder, "which is not a file name in")


def test_gpt2_conv1d_tensor_that_is_not_a_matrix(gpt2_dir, tmp_path):
    # A Conv1D weight stored with 3 dimensions: RuntimeError from tensor.t() before.
    folder = _variant(gpt2_dir, tmp_path / "m")
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    key = "transformer.h.0.attn.c_attn.weight"
    tensors[key] = tensors[key].reshape(2, 16, 96)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    message = _one_line_error(folder, f"tensor '{key}' has shape")
    assert "(2, 16, 96), expected a matrix" in message


def test_safetensors_header_length_and_offsets(gpt2_dir, tmp_path):
    folder = _variant(gpt2_dir, tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    for length in (0, 2**63, 2**64 - 1, len(data)):
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", length) + data[8:])
        _one_line_error(folder, "is not a readable safetensors file")
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    for offsets in ([end, start], [start, 2**64], [-1, end], [start, len(data)]):
        bad = {**header, name: {**header[name], "data_offsets": offsets}}
        text = json.dumps(bad).encode()
        (folder / "model.safetensors").write_bytes(
            struct.pack("<Q", len(text)) + text + data[8 + n :]
        )
        _one_line_error(folder, "is not a readable safetensors file")


def test_unknown_architecture_error_is_one_line(gpt2_dir, tmp_path):
    # transformers' own error (several lines) came through unchanged before.
    folder = _variant(gpt2_dir, tmp_path / "m", model_type="")
    with pytest.raises(PocketLMError, match="transformers cannot load architecture ''") as info:
        load(folder)
    assert "\n" not in str(info.value)


def test_good_values_still_load(llama_dir, tmp_path):
    # The checks reject what is broken, not what is unusual: explicit defaults, a llama3
    # rope_scaling, a sliding window, an explicit head_dim.
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    folder = _variant(llama_dir, tmp_path / "m", rope_scaling=scaling, head_dim=8,
                      sliding_window=16, max_position_embeddings=2**20, rope_theta=500000)  # fmt: skip
    model = load(folder).model
    assert (model.config.head_dim, model.config.context_length) == (8, 2**20)
    logits = model(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]))
    assert logits.shape == (1, 2, 50257) and torch.isfinite(logits).all()


def test_address_space_too_small_to_map_the_file(gpt2_dir, tmp_path):
    # safe_open maps the whole file; under `ulimit -v` a large file raised MemoryError.
    folder = _variant(gpt2_dir, tmp_path / "m")
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) + 2**30)  # a 1 GB sparse tail: no disk, but 1 GB to map
    script = (
        "import resource, sys\n"
        "from pocketlm.errors import PocketLMError\n"
        "from pocketlm.weights.loader import load\n"
        "vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 2**28, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    load(sys.argv[1])\n"
        "except PocketLMError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cannot memory-map" in done.stdout and "ulimit -v" in done.stdout
