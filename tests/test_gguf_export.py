"""`pocketlm export MODEL --gguf`: the file it writes is the file llama.cpp's own
`convert_hf_to_gguf.py` writes from the same HF folder -- every tensor (names, shapes,
bytes, in F32 and Q8_0) and the metadata llama.cpp reads (the architecture's keys and the
whole tokenizer), compared through the `gguf` library's reader -- and pocketlm runs it with
the folder's logits and greedy tokens. A fine-tune of a GGUF model carries its base file's
tokenizer keys verbatim."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader

import pocketlm
from convert import Conversion, make_convertible
from pocketlm.cli.main import main
from pocketlm.weights import loader

CASES = {
    "llama-f32": ("llama", "f32"),
    "llama-q8_0": ("llama", "q8_0"),
    "gpt2-f32": ("gpt2", "f32"),
}
# What llama.cpp's converter adds that pocketlm does not write (file names, its own notes).
NOT_COMPARED = ("general.", "GGUF.")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    return {
        "llama": make_convertible(root / "llama", model_type="llama", num_key_value_heads=2),
        "gpt2": make_convertible(root / "gpt2", model_type="gpt2", n_ctx=128),  # for the converter
    }


@pytest.fixture(scope="module")
def conversions(folders, tmp_path_factory) -> dict:
    """llama.cpp's converter on each folder, started together in the background."""
    root = tmp_path_factory.mktemp("llama-cpp")
    return {
        case: Conversion(folders[kind], root / f"{case}.gguf", outtype=qtype)
        for case, (kind, qtype) in CASES.items()
    }


def fields(reader: GGUFReader) -> dict:
    return {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith(NOT_COMPARED)
    }


@pytest.mark.parametrize("case", list(CASES))
def test_export_writes_what_llama_cpps_converter_writes(case, folders, conversions, tmp_path):
    kind, qtype = CASES[case]
    ours = tmp_path / f"{case}.gguf"
    assert main(["export", str(folders[kind]), "--gguf", "--type", qtype, "--out", str(ours)]) == 0
    theirs = GGUFReader(conversions[case].wait())
    mine = GGUFReader(ours)
    assert mine.fields["general.architecture"].contents() == kind
    assert fields(mine) == fields(theirs)
    expected = {t.name: t for t in theirs.tensors}
    assert sorted(t.name for t in mine.tensors) == sorted(expected)
    for tensor in mine.tensors:
        other = expected[tensor.name]
        assert (tensor.tensor_type, list(tensor.shape)) == (other.tensor_type, list(other.shape))
        assert np.array_equal(tensor.data, other.data), tensor.name
    # pocketlm runs the file as the folder: the same logits (F32), the same greedy tokens.
    ids = torch.tensor([[464, 3290, 318, 257, 11, 290]])
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        folder_logits = loader.load(folders[kind]).model(ids, positions)
        file_logits = loader.load(ours, dtype=torch.float32).model(ids, positions)
    tolerance = 1e-5 if qtype == "f32" else 0.05  # Q8_0: one rounding of each weight
    assert (folder_logits - file_logits).abs().max() < tolerance
    if qtype == "f32":
        expected_text = pocketlm.load(folders[kind]).generate("The dog", max_tokens=16,
                                                              temperature=0).text  # fmt: skip
        assert pocketlm.load(ours).generate("The dog", max_tokens=16, temperature=0).text == (
            expected_text
        )


def test_an_unsupported_family_and_an_existing_file_are_one_line_errors(folders, tmp_path, capsys):
    out = tmp_path / "taken.gguf"
    out.write_bytes(b"")
    assert main(["export", str(folders["gpt2"]), "--gguf", "--out", str(out)]) == 1
    assert capsys.readouterr().err == (
        f"error: {out} already exists; choose another --out or pass --overwrite\n"
    )
    from checkpoints import make_family

    neox = make_family(tmp_path / "neox", model_type="gpt_neox")
    capsys.readouterr()  # transformers' save_pretrained progress bar
    assert main(["export", str(neox), "--gguf", "--out", str(tmp_path / "neox.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: GGUF export does not handle model_type gpt_neox yet")
    assert err.count("\n") == 1 and not (tmp_path / "neox.gguf").exists()
