"""Tokenizer tests against independent oracles: transformers' tokenizers and tiktoken.

GPT-2: the shipped vocabulary against `GPT2TokenizerFast.from_pretrained` and a tiktoken
`Encoding` built from the same encoder.json (a separate BPE implementation). SmolLM2: the
tokenizer built from the real GGUF's metadata against transformers' own GGUF loader, and
against tiktoken with the model's digit-splitting pre-tokenizer. Every oracle is first
checked for sanity, since an empty one would agree with nothing and prove nothing.
"""

import json
import shutil
import unicodedata
from pathlib import Path

import pytest
import tiktoken
from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as Backend
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

from pocketlm.errors import PocketLMError
from pocketlm.tokenizer import Tokenizer
from pocketlm.tokenizer.decoding import bytes_to_unicode

GPT2_DATA = Path(__file__).parents[1] / "src" / "pocketlm" / "data" / "gpt2"

# GPT-2's own pre-tokenizer regex (tiktoken's r50k_base).
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2's pre-tokenizer (every digit alone, then GPT-2's regex on what is between) as one
# regex: a digit is a match of its own, and a whitespace run may end right before a digit.
SMOLLM_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; they'll arrive at 10.5, won't they?",
    "In 1869, Dmitri Mendeleev published his periodic table.\nIt had gaps -- for elements\n"
    "nobody had found yet -- and he predicted their properties.\n\nHe was right.",
    'def fib(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n'
    "        return n\n    return fib(n - 1) + fib(n - 2)\n\n\nprint([fib(i) for i in range(10)])\n",
    "class A:\n\tdef f(self):\n\t\treturn {'a': [1, 2], \"b\": None}  # comment\n",
    "   leading spaces",
    "trailing spaces   ",
    "tabs\tand\t\tdouble tabs\t",
    "\n\n\nnewlines\r\nCRLF\rCR\n",
    "  \t \n mixed \u00a0 nbsp \u2003 em space",
    "",
    " ",
    "\n",
    "👋🏽 hi 🎉🎉🎉",
    "family 👨\u200d👩\u200d👧\u200d👦, flag 🇫🇷, rainbow 🏳️\u200d🌈",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Café naïve résumé — e\u0301 combining, A\u030a, Ångström, ﬁ ligature",
    "bell\x07 null\x00 esc\x1b[31m del\x7f",
    "before<|endoftext|>after",
    "<|endoftext|><|endoftext|> x",
    "3.14159 1,000,000 2024-11-24 0x1F 1e-10",
    "Здравствуй, мир! Γειά σου κόσμε! مرحبا بالعالم",
    "I'M YOU'RE we'd 'quoted' ’curly’ don't",
    "a" * 300 + " " + "ab" * 100,
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ½ ² ٣ Ⅻ",
    "https://example.com/path?q=1&r=two#frag <html><b>bold</b></html>",
]


def _transformers_cuts_differently(text: str) -> bool:
    """Whitespace before a number where transformers' GGUF loader (GPT-2's split) and
    SmolLM2's own tokenizer (every digit cut off first) disagree: a run of two or more
    whitespace characters, or a space before a non-ASCII number ("½")."""
    for i, c in enumerate(text):
        spaced = c.isnumeric() and i >= 1 and text[i - 1].isspace()
        if spaced and ((i >= 2 and text[i - 2].isspace()) or c not in "0123456789"):
            return True
    return False


# Only where transformers' GGUF loader cuts differently from the model's own tokenizer.
SMOLLM_DIGIT_CASES = [
    "  1",
    "a  12",
    "x\n\n 3",
    "Year  2024",
    "\t\t5",
    "items:\n  -  1\n  -   22",
    "    return\n    0",
    "total:   ½",
    "half: ½",
]


def _byte_ranks(tokens: dict[str, int]) -> dict[bytes, int]:
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    return {bytes(byte_of[c] for c in t): i for t, i in tokens.items()}


# -- fixtures (each tokenizer and oracle built once per module) -------------------------------


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def gpt2_hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(GPT2_DATA / name, folder / name)
    oracle = GPT2TokenizerFast.from_pretrained(folder)
    assert oracle.encode("Hello world") == [15496, 995]  # not the empty tokenizer trap
    return oracle


@pytest.fixture(scope="module")
def gpt2_tiktoken():
    encoder = json.loads((GPT2_DATA / "vocab.json").read_text(encoding="utf-8"))
    del encoder["<|endoftext|>"]
    oracle = tiktoken.Encoding(
        name="r50k",
        pat_str=R50K_PATTERN,
        mergeable_ranks=_byte_ranks(encoder),
        special_tokens={"<|endoftext|>": 50256},
    )
    assert oracle.encode("Hello world") == [15496, 995]
    return oracle


@pytest.fixture(scope="module")
def smollm_meta(smollm2_metadata) -> dict:
    """The GGUF's tokenizer metadata as a plain dict (what pocketlm.weights passes on)."""
    return {k: v for k, v in smollm2_metadata.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smollm(smollm_meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm_meta)


@pytest.fixture(scope="module")
def smollm_hf(smollm2_gguf):
    oracle = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    assert oracle.encode("Hello world") == [19556, 905]
    assert len(oracle) == 49152
    return oracle


@pytest.fixture(scope="module")
def smollm_tiktoken(smollm_meta):
    tokens, types = smollm_meta["tokenizer.ggml.tokens"], smollm_meta["tokenizer.ggml.token_type"]
    # Ranks by id are the merge order here (each merge's token id grows with its rank).
    oracle = tiktoken.Encoding(
        name="smollm2",
        pat_str=SMOLLM_PATTERN,
        mergeable_ranks=_byte_ranks({t: i for i, t in enumerate(tokens) if types[i] == 1}),
        special_tokens={t: i for i, t in enumerate(tokens) if types[i] == 3},
    )
    assert oracle.encode("Hello world") == [19556, 905]
    return oracle


# -- GPT-2 ------------------------------------------------------------------------------------


def test_gpt2_basics(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_ids == frozenset({50256})
    assert gpt2.bos_id == 50256 and gpt2.add_bos is False
    assert gpt2.chat_template is None
    assert gpt2.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("text", CORPUS)
def test_gpt2_ids_match_transformers_and_tiktoken(gpt2, gpt2_hf, gpt2_tiktoken, text):
    ids = gpt2.encode(text)
    assert ids == gpt2_hf.encode(text)
    assert ids == gpt2_tiktoken.encode(text, allowed_special="all")
    assert gpt2.decode(ids) == text


def test_gpt2_special_token_in_text(gpt2):
    assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert gpt2.token_bytes(50256) == b"<|endoftext|>"
    assert gpt2.token_bytes(220) == b" "  # "Ġ"


def test_gpt2_decode_matches_transformers(gpt2, gpt2_hf):
    ids = [i for text in CORPUS for i in gpt2.encode(text)]
    assert gpt2.decode(ids) == gpt2_hf.decode(ids, clean_up_tokenization_spaces=False)


def test_from_dir_gpt2_layout_equals_shipped(gpt2, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(GPT2_DATA / name, tmp_path / name)
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.vocab_size == 50257 and loaded.eos_ids == frozenset({50256})
    assert loaded.add_bos is False and loaded.chat_template is None
    text = "\n".join(CORPUS)
    assert loaded.encode(text) == gpt2.encode(text)


def test_encode_batch_equals_encode(gpt2):
    assert gpt2.encode_batch(CORPUS) == [gpt2.encode(t) for t in CORPUS]
    assert gpt2.encode_batch(["x"], add_bos=True) == [[50256, 87]]


# -- SmolLM2 from GGUF metadata ---------------------------------------------------------------


def test_smollm_basics(smollm):
    assert smollm.vocab_size == 49152
    assert smollm.bos_id == 1  # <|im_start|>
    assert smollm.eos_ids == frozenset({2, 0})  # <|im_end|> (the file's eos) and <|endoftext|>
    assert smollm.add_bos is False
    assert smollm.special_tokens["eos_token"] == "<|im_end|>"
    assert smollm.encode("hi", add_bos=True) == [1, *smollm.encode("hi")]


def test_smollm_chat_tokens_are_single_ids(smollm):
    assert smollm.encode("<|im_start|>") == [1]
    assert smollm.encode("<|im_end|>") == [2]
    assert smollm.encode("<|endoftext|>") == [0]
    ids = smollm.encode("<|im_start|>user\nHi there<|im_end|>\n")
    assert ids[0] == 1 and 2 in ids
    assert smollm.token_bytes(2) == b"<|im_end|>"


def test_smollm_same_tokens_and_specials_as_transformers(smollm, smollm_hf):
    assert smollm.bos_id == smollm_hf.bos_token_id
    assert smollm_hf.eos_token_id in smollm.eos_ids
    assert smollm.special_tokens == smollm_hf.special_tokens_map


@pytest.mark.parametrize("text", [t for t in CORPUS if not _transformers_cuts_differently(t)])
def test_smollm_ids_match_transformers_and_tiktoken(smollm, smollm_hf, smollm_tiktoken, text):
    ids = smollm.encode(text)
    assert ids == smollm_hf.encode(text)
    assert ids == smollm_tiktoken.encode(text, allowed_special="all")
    assert smollm.decode(ids) == text


@pytest.mark.parametrize(
    "text", SMOLLM_DIGIT_CASES + [t for t in CORPUS if _transformers_cuts_differently(t)]
)
def test_smollm_splits_digits_like_the_model(smollm, smollm_tiktoken, text):
    # The model's tokenizer (and llama.cpp's "smollm" pre-tokenizer) cut every digit off
    # first, so a space run before a digit stays whole; transformers' GGUF loader does not
    # (and cuts " ½" inside its UTF-8 bytes: "ĠÂ" then the last byte).
    assert _transformers_cuts_differently(text)
    ids = smollm.encode(text)
    assert ids == smollm_tiktoken.encode(text)
    assert smollm.decode(ids) == text


def test_smollm_space_run_before_digit_by_hand(smollm):
    assert smollm.encode("  1") == [256, 33]  # "ĠĠ", "1" (not "Ġ", "Ġ", "1")


def test_smollm_bytes_missing_from_vocab_are_dropped_like_transformers(smollm, smollm_hf):
    # SmolLM2's vocabulary lacks a few bytes (0x04, 0x1d...): like HF, they are dropped.
    for text in ("a\x04b", "x\x1dy"):
        ids = smollm.encode(text)
        assert ids == smollm_hf.encode(text)
        assert smollm.decode(ids) == text[0] + text[2]


# -- streaming --------------------------------------------------------------------------------


def _stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tokenizer.stream_decoder()
    return [decoder.feed(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("name", ["gpt2", "smollm"])
def test_stream_concatenates_to_decode_without_broken_characters(name, request):
    tokenizer = request.getfixturevalue(name)
    held = 0
    for text in CORPUS:
        ids = tokenizer.encode(text)
        pieces = _stream(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)
        held += pieces[:-1].count("")
    assert held > 0  # some character really was split across tokens and held back


@pytest.mark.parametrize("name", ["gpt2", "smollm"])
def test_stream_holds_partial_characters(name, request):
    tokenizer = request.getfixturevalue(name)
    ids = tokenizer.encode("👋")
    assert len(ids) > 1  # the emoji's 4 bytes are cut across tokens
    decoder = tokenizer.stream_decoder()
    assert [decoder.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.feed(ids[-1]) == "👋"
    decoder.feed(ids[0])
    assert decoder.flush() == "\ufffd"  # an unfinished character at the end
    assert decoder.feed(tokenizer.encode("ok")[0]) == "ok"  # usable again after flush


def test_stream_decoders_are_independent(gpt2):
    first, second = gpt2.stream_decoder(), gpt2.stream_decoder()
    emoji = gpt2.encode("🎉")
    assert first.feed(emoji[0]) == ""  # holds a partial character...
    assert second.feed(gpt2.encode("a")[0]) == "a"  # ...that the other one never sees
    assert [first.feed(i) for i in emoji[1:]][-1] == "🎉"


def test_ids_past_the_vocabulary_decode_to_nothing(gpt2):
    assert gpt2.token_bytes(50257) == b"" and gpt2.decode([15496, 60000, 995]) == "Hello world"


# -- folders ----------------------------------------------------------------------------------


def test_from_dir_without_tokenizer_files_says_what_it_expects(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PocketLMError) as caught:
        Tokenizer.from_dir(tmp_path)
    message = str(caught.value)
    assert str(tmp_path) in message and "tokenizer.json" in message
    assert "vocab.json" in message and "merges.txt" in message and "\n" not in message


def test_from_dir_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(PocketLMError, match="cannot be read as a tokenizer") as caught:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(caught.value)


def test_from_dir_not_a_folder(tmp_path):
    with pytest.raises(PocketLMError, match="not a folder"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_gguf_unsupported_tokenizer_model_is_a_clear_error(smollm_meta):
    with pytest.raises(PocketLMError, match="'rwkv' is not supported") as caught:
        Tokenizer.from_gguf_metadata({**smollm_meta, "tokenizer.ggml.model": "rwkv"})
    assert "\n" not in str(caught.value)
    with pytest.raises(PocketLMError, match="'t5' is T5's Unigram.*causal language models"):
        Tokenizer.from_gguf_metadata({**smollm_meta, "tokenizer.ggml.model": "t5"})
    with pytest.raises(PocketLMError, match="pre-tokenizer 'mystery' is unknown") as caught:
        Tokenizer.from_gguf_metadata({**smollm_meta, "tokenizer.ggml.pre": "mystery"})
    assert "\n" not in str(caught.value)


def test_from_dir_tokenizer_json_with_config(smollm_hf, smollm, tmp_path):
    """A tokenizer.json folder (as transformers saves one), with config files for eos/bos."""
    smollm_hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": True}
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.bos_id == 1 and loaded.add_bos is True
    assert loaded.eos_ids == frozenset({0, 2, 7})
    text = "\n".join(t for t in CORPUS if not _transformers_cuts_differently(t))
    assert loaded.encode(text) == [1, *smollm.encode(text)]
    assert loaded.render_chat([{"role": "user", "content": "hey"}]) == "hey"


def _sentencepiece_folder(folder) -> Backend:
    """A tiny Llama-2-style tokenizer.json: byte fallback, "▁" for spaces, a leading "▁"
    added by the normalizer and stripped again by the decoder."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    pieces += ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁he", "▁hel", "▁hell", "▁hello"]
    merges = [("▁", "h"), ("▁h", "e"), ("▁he", "l"), ("▁hel", "l"), ("▁hell", "o")]
    vocab = {p: i for i, p in enumerate(pieces)}
    backend = Backend(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in pieces[:3]])
    backend.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return backend


def test_sentencepiece_style_folder(tmp_path):
    backend = _sentencepiece_folder(tmp_path)
    oracle = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_id == 1 and tok.eos_ids == frozenset({2}) and tok.add_bos
    for text in ["hello world", "hello  wörld ☃", "héllo\nhello"]:
        ids = tok.encode(text)
        assert ids == [1, *backend.encode(text).ids]
        assert tok.decode(ids[1:]) == backend.decode(ids[1:]) == text
        assert tok.decode(ids) == oracle.decode(ids) == "<s> " + text
        first = tok.stream_decoder(at_start=True)
        assert "".join([first.feed(i) for i in ids[1:]] + [first.flush()]) == text
    # A continuation keeps the space of its first word: "hello" + " hello".
    continuation = tok.stream_decoder()
    assert continuation.feed(tok.encode("hello", add_bos=False)[0]) == " hello"


def test_nfc_and_nfd_are_different_texts(gpt2):
    composed, decomposed = "é", unicodedata.normalize("NFD", "é")
    assert gpt2.decode(gpt2.encode(composed)) == composed
    assert gpt2.decode(gpt2.encode(decomposed)) == decomposed


# -- other GGUF pre-tokenizers, on GPT-2's vocabulary -----------------------------------------

# The split regexes as Llama 3 (Meta's tiktoken tokenizer.py) and Qwen2 (tokenizer.json) publish them.
PUBLISHED_SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt-2": R50K_PATTERN,
}


@pytest.mark.parametrize("pre", list(PUBLISHED_SPLITS))
def test_gguf_pre_tokenizers_match_tiktoken(pre):
    vocab = json.loads((GPT2_DATA / "vocab.json").read_text(encoding="utf-8"))
    merges = (GPT2_DATA / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    tokens = sorted(vocab, key=vocab.get)
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 50256 + [3],
        "tokenizer.ggml.merges": [m for m in merges if m],
        "tokenizer.ggml.bos_token_id": 50256,
        "tokenizer.ggml.eos_token_id": 50256,
    }
    tok = Tokenizer.from_gguf_metadata(meta)
    del vocab["<|endoftext|>"]
    oracle = tiktoken.Encoding(
        name=pre,
        pat_str=PUBLISHED_SPLITS[pre],
        mergeable_ranks=_byte_ranks(vocab),
        special_tokens={"<|endoftext|>": 50256},
    )
    # llama.cpp adds BOS by default for the Llama 3 family only (the file may say otherwise).
    assert tok.add_bos is (pre == "llama-bpe")
    assert (
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.add_bos_token": False}).add_bos
        is False
    )
    for text in CORPUS + SMOLLM_DIGIT_CASES:
        ids = tok.encode(text, add_bos=False)
        assert ids == oracle.encode(text, allowed_special="all"), text
        assert tok.decode(ids) == text
