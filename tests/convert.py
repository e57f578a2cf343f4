"""GGUF files made the way users make them: llama.cpp's own `convert_hf_to_gguf.py` (from
the llama.cpp source that tests/vendor.py fetches) run on the random HF checkpoints of
tests/checkpoints.py.

The converter identifies a BPE tokenizer by hashing how it splits a fixed text, and refuses
one it does not know, so each checkpoint gets a real vocabulary it knows: GPT-2's (shipped
with pocketlm; "gpt-2") for GPT-2, Llama, Mistral, Mixtral, GPT-NeoX, Falcon, StableLM and
Starcoder2, Qwen2's (llama.cpp's vocab-only ggml-vocab-qwen2.gguf; "qwen2") for Qwen2,
Qwen3 and their MoEs, whose tokenizer class transformers 5 always builds with Qwen2's own
split pattern. Gemma's converter reads a SentencePiece tokenizer.model instead: Mistral
7B's (mistral-common wheel, 32,000 pieces), beside the GPT-2 files that pocketlm's folder
loader reads. The converter runs in a subprocess with its own gguf-py (it puts that first
on sys.path). Without the llama.cpp download the tests skip.

One shim, for GPT-NeoX: the converter reads `rotary_pct` from the config transformers
gives it, and transformers 5 folds that key into rope_parameters["partial_rotary_factor"]
(a KeyError otherwise). The shim hands the converter the old key back, as transformers 4
did, and changes nothing else.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import vendor
from checkpoints import FAMILIES, make_family, make_gpt2, make_llama

QWEN2_VOCAB = 151936  # Qwen2's embedding rows: 151,643 BPE tokens, 3 specials, padding
QWEN2_EOS = 151643  # <|endoftext|>
SPM_VOCAB = 32000  # Mistral 7B v0.1's tokenizer.model.v1: <unk>, <s>, </s>, then pieces
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")


class Conversion:
    """`folder` (an HF checkpoint) -> `outfile` by llama.cpp's convert_hf_to_gguf.py, run in
    the background: several conversions overlap (each is mostly imports). `wait()` for it."""

    def __init__(self, folder: Path, outfile: Path, *, outtype: str = "f32") -> None:
        script = vendor.llama_cpp() / "convert_hf_to_gguf.py"
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py
        model_type = json.loads((folder / "config.json").read_text())["model_type"]
        run = ["-c", _NEOX_SHIM, str(script)] if model_type == "gpt_neox" else [str(script)]
        command = [sys.executable, *run, str(folder), "--outfile", str(outfile),
                   "--outtype", outtype]  # fmt: skip
        self.folder, self.outfile, self.log = folder, outfile, outfile.with_suffix(".log")
        with open(self.log, "w") as log:  # a file, not a pipe that could fill and block
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env)

    def wait(self) -> Path:
        """The GGUF file, once written (an AssertionError with the converter's log if not)."""
        if self.process.wait(timeout=600) != 0 or not self.outfile.is_file():
            log = self.log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"convert_hf_to_gguf.py failed on {self.folder}:\n{log}")
        return self.outfile


# Runs the converter (argv[1]) with GPTNeoXModel given `rotary_pct` (see the docstring).
_NEOX_SHIM = """
import runpy, sys
from pathlib import Path
script = Path(sys.argv[1])
sys.path[:0] = [str(script.parent), str(script.parent / "gguf-py")]  # as the script does
from conversion.gptneox import GPTNeoXModel
set_gguf_parameters = GPTNeoXModel.set_gguf_parameters
def with_rotary_pct(self):
    self.hparams.setdefault("rotary_pct", self.rope_parameters["partial_rotary_factor"])
    set_gguf_parameters(self)
GPTNeoXModel.set_gguf_parameters = with_rotary_pct
sys.argv = sys.argv[1:]
runpy.run_path(str(script), run_name="__main__")
"""


def convert(folder: Path, outfile: Path, *, outtype: str = "f32") -> Path:
    """`folder` (an HF checkpoint) -> `outfile`, by llama.cpp's convert_hf_to_gguf.py."""
    return Conversion(folder, outfile, outtype=outtype).wait()


def make_convertible(folder: Path, *, model_type: str, spm: bool = False, **config) -> Path:
    """A random checkpoint as tests/checkpoints.py makes it, with a tokenizer the
    converter knows (see the module docstring); `config` overrides the config's fields.
    `spm`: a Phi-3 converted with a SentencePiece vocabulary (`spm_tokenizer_model`)."""
    if model_type == "gpt2":
        make_gpt2(folder, **config)
    elif model_type in GEMMA_TYPES:
        ids = dict(vocab_size=SPM_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        make_llama(folder, model_type=model_type, **{**ids, **config})
        shutil.copy(vendor.mistral_tokenizers() / "tokenizer.model.v1", folder / "tokenizer.model")
        return folder
    elif model_type in FAMILIES:
        make_family(folder, model_type=model_type, **config)
    elif model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        ids = dict(vocab_size=QWEN2_VOCAB, bos_token_id=QWEN2_EOS, eos_token_id=QWEN2_EOS)
        make_llama(folder, model_type=model_type, **{**ids, **config})
        qwen2_vocab_files(folder)
        return folder
    else:
        make_llama(folder, model_type=model_type, **config)
    gpt2_tokenizer_json(folder)
    if model_type == "phi3" and spm:
        spm_tokenizer_model(folder)
    return folder


def spm_tokenizer_model(folder: Path) -> None:
    """Mistral 7B's SentencePiece tokenizer.model beside the folder's GPT-2 tokenizer.json,
    and tokenizer_config.json naming a LlamaTokenizer: what the converter's Phi-3 class
    reads (as it does Phi-3's own); without it, it takes the GPT-2 BPE, as for Phi-4-mini.
    pocketlm and transformers still read the folder's tokenizer.json."""
    import shutil

    shutil.copy(vendor.mistral_tokenizers() / "tokenizer.model.v1", folder / "tokenizer.model")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "LlamaTokenizer"
    config_file.write_text(json.dumps(config), encoding="utf-8")


def gpt2_tokenizer_json(folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json from the folder's GPT-2 vocab.json and
    merges.txt: the converter loads a fast tokenizer, and transformers 5 builds none for
    a Llama from those two files alone."""
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(folder)
    assert tokenizer.encode("Hello world") == [15496, 995]  # an empty oracle proves nothing
    tokenizer.save_pretrained(folder)


def qwen2_vocab_files(folder: Path) -> None:
    """Qwen2's real vocab.json and merges.txt (in place of GPT-2's), from llama.cpp's
    vocab-only GGUF; its 3 special tokens are added by transformers' Qwen2Tokenizer."""
    from transformers import AutoTokenizer

    from pocketlm.weights.gguf import read_gguf

    meta = read_gguf(vendor.llama_cpp() / "models" / "ggml-vocab-qwen2.gguf").metadata
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {
        token: i for i, (token, kind) in enumerate(zip(tokens, types, strict=True)) if kind == 1
    }
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "\n".join(["#version: 0.2", *meta["tokenizer.ggml.merges"]]) + "\n"
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.encode("Hello world") == [9707, 1879]  # Qwen2's own ids
