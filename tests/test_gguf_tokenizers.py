"""Tokenizers built from GGUF metadata, against independent oracles.

- llama.cpp's own golden tokenizations: every `models/ggml-vocab-*.gguf` with `.inp`/`.out`
  beside it (made with each model's Hugging Face tokenizer; llama.cpp's test-tokenizer-0
  checks itself against them). Every line must give exactly the ids of the `.out` and
  decode back to its input; a BERT vocabulary must be refused with the reason.
- sentencepiece on Mistral's real `tokenizer.model` files (mistral-common wheel), against
  pocketlm's SentencePiece built from the same pieces, scores and types written as GGUF
  metadata; tiktoken on Llama 3's real vocabulary (llama-models wheel), against pocketlm's
  "llama-bpe" GGUF vocabulary. Both on a generated corpus of 3,000 varied lines.
- llama.cpp's source: every `tokenizer.ggml.pre` name maps to the regexes and settings
  `llama-vocab.cpp` gives it (or the tokenizer.json originals it quotes).

Once, by hand (not here: it needs llama.cpp built), llama.cpp's own `llama_tokenize`
(parse_special on) ran 3,000 such lines for every name, on Qwen2's vocabulary (Gemma 4's for
the "▁" ones): 72 of the 90 names gave the same ids on every line. The other 18 differ only
where llama.cpp departs from the model's own tokenizer, each difference traced: its rewrites
of GPT-4o-style regexes lose case changes and combining marks outside ASCII (gpt-4o, llama4,
kanana2, talkie, minimax-m2, tekken, youtu, tiny_aya, cohere2moe: fed llama.cpp's rewrites,
pocketlm gives llama.cpp's ids exactly; kimi-k2, whose C++ split reads letters the same
way); it shows non-ASCII whitespace as "\v" to regexes that name character ranges
(deepseek-llm, deepseek-coder); its Unicode tables predate U+1FAE9 (deepseek-v3, hunyuan-dense, joyai-llm, hy_v4, spark2_5, afmoe: one line each). On
the 14 golden vocabularies themselves, 12 agreed on every line; deepseek-llm differs on 19
lines (the whitespace above) and falcon on 45, all holding a byte its vocabulary lacks
(transformers drops such a byte before merging, llama.cpp after).

The vendored files are fetched once per machine by tests/vendor.py (the tests skip with the
reason when there is no network). A GGUF's metadata is read here by a small reader of its
own: gguf-py takes seconds on a 256k-token vocabulary.
"""

import ast
import functools
import random
import re
import struct
from pathlib import Path

import pytest
import sentencepiece
import tiktoken
from tiktoken.load import load_tiktoken_bpe

import vendor
from pocketlm.errors import PocketLMError
from pocketlm.tokenizer import Tokenizer
from pocketlm.tokenizer.decoding import BYTE_OF_CHAR

# Every vocabulary llama.cpp ships golden tokenizations for (checked against the folder, so a
# new llama.cpp with a new file fails here until it is added).
GOLDEN = [
    "bert-bge", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4", "gpt-2",
    "llama-bpe", "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder",
]  # fmt: skip
# Encoder vocabularies: refused with the reason, never tokenized wrongly.
REFUSED = {"bert-bge": "'bert' is BERT's WordPiece.*causal language models"}

# Llama 3's split, as Meta's tokenizer.py gives it to tiktoken.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MISTRAL_MODELS = [
    "tokenizer.model.v1",  # Mistral 7B v0.1: 32,000 pieces
    "mistral_instruct_tokenizer_240323.model.v3",  # 32,768, with [INST] and 750 controls
    "mistral_instruct_tokenizer_241114.model.v7",
]

# -- reading llama.cpp's files ----------------------------------------------------------------

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q"}
_SCALARS[12] = "d"


def read_metadata(path: Path) -> dict:
    """A GGUF file's metadata (key -> value; arrays as lists), nothing else."""
    data = path.read_bytes()
    pos = 24  # magic, version, tensor count, key count

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def value(kind: int):
        if kind == 8:
            return take(f"{take('Q')}s").decode("utf-8")
        if kind != 9:
            return take(_SCALARS[kind])
        item, count = take("I"), take("Q")
        if item in _SCALARS:
            return list(take(f"{count}{_SCALARS[item]}")) if count != 1 else [take(_SCALARS[item])]
        return [value(item) for _ in range(count)]

    assert data[:4] == b"GGUF", path
    meta = {}
    for _ in range(struct.unpack_from("<Q", data, 16)[0]):
        key = value(8)
        meta[key] = value(take("I"))
    return meta


def golden_cases(vocab: Path) -> list[tuple[str, list[int]]]:
    """The (text, ids) pairs of `<vocab>.inp` / `.out`, split as test-tokenizer-0.cpp does:
    inputs end with a "__ggml_vocab_test__" line, one line of ids each."""
    separator = "\n__ggml_vocab_test__\n"
    raw = Path(f"{vocab}.inp").read_bytes().decode("utf-8")
    texts = raw.split(separator)
    if raw.endswith(separator):
        texts.pop()
    lines = Path(f"{vocab}.out").read_bytes().decode("utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    assert len(texts) == len(lines) > 40, vocab
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines, strict=True)]


def golden_path(name: str) -> Path:
    return vendor.llama_cpp() / "models" / f"ggml-vocab-{name}.gguf"


@functools.cache
def golden_tokenizer(name: str) -> Tokenizer:
    """pocketlm's tokenizer of a golden vocabulary, built once (tests must not change it)."""
    return Tokenizer.from_gguf_metadata(read_metadata(golden_path(name)))


# -- the corpus -------------------------------------------------------------------------------

_WORDS = [
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "it",
    "he", "she", "they", "we", "you", "I", "at", "from", "this", "have", "not", "but", "had",
    "his", "her", "are", "or", "which", "an", "were", "been", "has", "their", "more", "one",
    "all", "would", "there", "what", "so", "if", "about", "who", "out", "up", "them", "some",
    "could", "into", "than", "other", "then", "its", "time", "only", "new", "Hello", "World",
    "Python", "Llama", "Mistral", "GPT", "naïve", "café", "résumé", "Ångström", "façade",
    "coöperate", "don't", "it's", "we're", "they've", "I'm", "you'll", "he'd", "SHOULDN'T",
    "O'Neill", "rock'n'roll",
]  # fmt: skip
_CODE = [
    "def f(x):\n    return x ** 2 + 1\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    "const add = (a, b) => a + b; // arrow\nconsole.log(add(2, 3));",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    'if __name__ == "__main__":\n    main()\n',
    '<div class="x"><p>Hi &amp; bye</p></div>',
    "    while True:\n        line = f.readline()\n        if not line:\n            break",
    "x = {'a': [1, 2, 3], \"b\": (4.5, -6e7), 'c': None}  # dict",
    '#include <stdio.h>\nint main(void) { printf("%d\\n", 42); return 0; }',
    "$ ls -la | grep '\\.py$' && echo \"done\" >> log.txt 2>&1",
    'fn main() { let v: Vec<u8> = vec![0xFF, 0x00]; println!("{:?}", v); }',
    "a[i]+=b[j]*c[k]-d/e%f^g|h&i~j<<2>>3;",
]
_EMOJI = [
    "😀",
    "👋🏽",
    "👨‍👩‍👧‍👦",
    "🇫🇷",
    "🏳️‍🌈",
    "❤️",
    "🦙",
    "🚀",
    "✅",
    "🎉🎉",
    "😶‍🌫️",
    "🤦🏻‍♂️",
    "©",
    "™",
]
_SCRIPTS = [
    "我想在apple工作", "日本語のテキストです。", "カタカナとひらがな", "한국어 텍스트입니다",
    "中文文本，标点符号。", "Здравствуй, мир!", "Γειά σου κόσμε", "مرحبا بالعالم", "שלום עולם",
    "नमस्ते दुनिया", "สวัสดีชาวโลก", "កាន់តែពិសេសអាច", "Xin chào Việt Nam", "Cửa Việt",
    "e\u0301 combining A\u030a", "ﬁ ligature ½ ² ٣ ४ Ⅻ １２３", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙", "Ｆｕｌｌ　ｗｉｄｔｈ",
]  # fmt: skip
_SPACES = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000"]
_SPACES += ["\u2003", "\u200b", "\x0b", "\x0c", "\u2028"]
# Characters few vocabularies hold (they end as bytes): controls, Latin-1, combining marks,
# general punctuation, private use, CJK extension B, old scripts, emoji, specials, plane 15.
_RARE = [(0x00, 0x1F), (0x7F, 0x9F), (0xA0, 0x17F), (0x300, 0x36F), (0x2000, 0x206F)]
_RARE += [(0xE000, 0xE0FF), (0x20000, 0x2A6DF), (0x1F000, 0x1FAFF), (0x10000, 0x1007F)]
_RARE += [(0xFFF0, 0xFFFD), (0xF0000, 0xF00FF)]


def _number(r: random.Random) -> str:
    kind = r.randrange(6)
    if kind == 0:
        return str(r.randrange(10 ** r.randrange(1, 13)))
    if kind == 1:
        return f"{r.uniform(-1e4, 1e4):.{r.randrange(0, 6)}f}"
    if kind == 2:
        return f"{r.randrange(1, 10**7):,}"
    if kind == 3:
        return f"{r.randrange(1900, 2100)}-{r.randrange(1, 13):02d}-{r.randrange(1, 29):02d}"
    if kind == 4:
        return f"0x{r.randrange(16**6):X}"
    return "3" * r.randrange(1, 12)


def _piece(r: random.Random) -> str:
    kind = r.randrange(9)
    if kind <= 2:
        word = r.choice(_WORDS)
        return word if r.random() < 0.8 else word.upper()
    if kind == 7:
        return "".join(chr(r.randrange(*r.choice(_RARE))) for _ in range(r.randrange(1, 4)))
    choices = {3: None, 4: _EMOJI, 5: _SCRIPTS, 6: list(".,;:!?()[]{}\"'`-—…/\\@#$%^&*+=<>|~_")}
    return _number(r) if kind == 3 else r.choice(choices.get(kind, _SPACES))


def corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """`n` varied lines, the same for a seed: prose, contractions, numbers, code, emoji,
    scripts, whitespace runs, and rare characters."""
    r = random.Random(seed)
    lines = []
    for i in range(n):
        if i % 5 == 4:
            line = r.choice(_CODE)
            line = line.replace("    ", r.choice(["  ", "    ", "\t"]))
        else:
            parts = [_piece(r) for _ in range(r.randrange(1, 16))]
            line = "".join(p + (r.choice(_SPACES) if r.random() < 0.2 else " ") for p in parts)
        if r.random() < 0.2:
            line = r.choice(_SPACES) * r.randrange(1, 4) + line
        if r.random() < 0.2:
            line = line.rstrip(" ")
        lines.append(line)
    return lines


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return corpus()


def test_corpus_is_varied(lines):
    text = "".join(lines)
    assert len(lines) == 3000 and len(set(lines)) > 2500
    for needle in ("   ", "\t\t", "\r\n", "\u3000", "0x", "333", "def ", "🦙", "我", "한", "\x00"):
        assert needle in text, needle
    assert sum(any(0xE000 <= ord(c) <= 0xF8FF for c in line) for line in lines) > 50
    assert sum(any(ord(c) >= 0x20000 for c in line) for line in lines) > 50


# -- llama.cpp's golden tokenizations ---------------------------------------------------------


def test_the_golden_vocabularies_are_the_known_ones():
    names = [
        p.name.removeprefix("ggml-vocab-").removesuffix(".gguf") for p in vendor.golden_vocabs()
    ]
    assert names == GOLDEN


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_tokenizations(name):
    path = golden_path(name)
    meta = read_metadata(path)
    if name in REFUSED:
        with pytest.raises(PocketLMError, match=REFUSED[name]) as caught:
            Tokenizer.from_gguf_metadata(meta)
        assert "\n" not in str(caught.value)
        return
    tokenizer = golden_tokenizer(name)
    cases = golden_cases(path)
    got = tokenizer.encode_batch([text for text, _ in cases], add_bos=False)
    wrong = [(text, ids, mine) for (text, ids), mine in zip(cases, got, strict=True) if mine != ids]
    assert not wrong, f"{len(wrong)} of {len(cases)} lines differ, first: {wrong[0]}"
    assert [tokenizer.decode(ids) for ids in got] == [text for text, _ in cases]


# BOS/EOS and end-of-generation tokens as llama.cpp reports them for each file.
SETTINGS = {
    "llama-spm": (1, True, {"</s>"}),
    "phi-3": (1, True, {"<|endoftext|>", "<|end|>"}),
    "gemma-4": (2, True, {"<eos>", "<turn|>", "<|tool_response>"}),
    "llama-bpe": (128000, True, {"<|end_of_text|>", "<|eot_id|>"}),
    "qwen2": (151643, False, {"<|endoftext|>", "<|im_end|>"}),
    "command-r": (5, True, {"<|END_OF_TURN_TOKEN|>"}),
    "gpt-2": (50256, False, {"<|endoftext|>"}),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_golden_vocab_settings_are_llama_cpps(name):
    tokenizer = golden_tokenizer(name)
    bos, add_bos, ends = SETTINGS[name]
    assert tokenizer.bos_id == bos and tokenizer.add_bos is add_bos
    assert {tokenizer.token_bytes(i).decode() for i in tokenizer.eos_ids} == ends
    assert (tokenizer.encode("Hello")[0] == bos) is add_bos


def test_sentencepiece_special_tokens_and_prefix_space_like_llama_cpp():
    # Checked against llama.cpp's llama_tokenize(parse_special=true): a special token is one
    # id, the text after it gets the prefix space again, and Phi-3's specials eat the
    # whitespace after them (llama.cpp knows that by the model's name).
    llama = golden_tokenizer("llama-spm")
    assert llama.encode("<s>hello", add_bos=False) == [1, 22172]  # <s> "▁hello"
    ids = llama.encode("a<s>b </s> c", add_bos=False)
    assert ids == [263, 1, 289, 29871, 2, 29871, 274]  # ... </s> "▁" "▁c"
    assert llama.decode(ids) == "a<s> b </s>  c"  # each prefix space is a real one
    phi3 = golden_tokenizer("phi-3")
    ids = phi3.encode("<|user|>\nHi there<|end|>\n<|assistant|>\n", add_bos=False)
    assert ids == [32010, 6324, 727, 32007, 32001]
    assert phi3.decode(ids) == "<|user|> Hi there<|end|><|assistant|>"


@pytest.mark.parametrize("name", ["llama-spm", "gemma-4"])
def test_sentencepiece_vocab_streams_like_decode(name, lines):
    tokenizer = golden_tokenizer(name)
    for line in lines[:300]:
        ids = tokenizer.encode(line, add_bos=False)
        stream = tokenizer.stream_decoder(at_start=True)
        assert "".join([stream.feed(i) for i in ids] + [stream.flush()]) == line


@pytest.mark.parametrize("name", ["llama-spm", "gemma-4", "deepseek-llm"])
def test_exported_tokenizer_json_reads_back_in_transformers(name, tmp_path, lines):
    """A GGUF model's tokenizer, saved as tokenizer.json (as `pocketlm finetune` exports
    it), gives the same ids in transformers and in pocketlm's folder loader."""
    from transformers import PreTrainedTokenizerFast

    from pocketlm.train.export import write_tokenizer

    tokenizer = golden_tokenizer(name)
    write_tokenizer(tokenizer, tmp_path, source=None)
    oracle = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    again = Tokenizer.from_dir(tmp_path)
    sample = lines[:500]
    ids = tokenizer.encode_batch(sample, add_bos=False)
    assert [oracle.encode(t, add_special_tokens=False) for t in sample] == ids
    assert again.encode_batch(sample, add_bos=False) == ids
    assert again.add_bos == tokenizer.add_bos and again.bos_id == tokenizer.bos_id


# -- the pre-tokenizer table, against llama.cpp's source --------------------------------------

_CONTRACTIONS_CPP = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"


def _normal(regex: str) -> str:
    """A regex as pocketlm writes it: control characters as escapes, contractions written
    case-insensitively (llama.cpp spells them out for std::regex; they match the same)."""
    regex = regex.replace("\r", r"\r").replace("\n", r"\n").replace("\t", r"\t")
    return regex.replace(_CONTRACTIONS_CPP, r"(?i:'s|'t|'re|'ve|'m|'ll|'d)")


def _cpp_strings(text: str) -> list[str]:
    return [ast.literal_eval(m) for m in re.findall(r'"(?:[^"\\\n]|\\.)*"', text)]


def llama_cpp_regexes(source: str) -> dict[str, tuple[list[str], bool]]:
    """LLAMA_VOCAB_PRE_TYPE_* -> (the regexes its BPE applies, each replaced by the original
    tokenizer.json regex where llama.cpp quotes one; whether words are byte-encoded)."""
    start = source.index("struct llm_tokenizer_bpe : llm_tokenizer {")
    body = source[start : source.index("std::vector<std::string> regex_exprs;", start)]
    found = {}
    for block in body.split("break;"):
        labels = re.findall(r"case LLAMA_VOCAB_PRE_TYPE_(\w+):", block)
        labels += ["DEFAULT"] if "default:" in block else []
        if "regex_exprs = {" not in block:
            continue
        regexes, original = [], None
        for line in block.splitlines():  # an original may be quoted above `regex_exprs`
            line = line.strip()
            if line.startswith("//") and _cpp_strings(line):
                original = _cpp_strings(line)[0]  # "original regex from tokenizer.json"
            elif line.startswith('"'):
                regexes.append(_normal(original or _cpp_strings(line)[0]))
                original = None
        found |= dict.fromkeys(labels, (regexes, "byte_encode = false" not in block))
    return found


def llama_cpp_names(source: str) -> dict[str, tuple[str, bool, bool]]:
    """tokenizer.ggml.pre name -> (its LLAMA_VOCAB_PRE_TYPE_*, ignore_merges, add_bos)."""
    start = source.index("if (tokenizer_pre.empty())")
    section = source[start : source.index("} else if (type == LLAMA_VOCAB_TYPE_SPM)", start)]
    names = {}
    for branch in section.split("} else if (")[1:]:
        kind = re.search(r"pre_type = LLAMA_VOCAB_PRE_TYPE_(\w+);", branch).group(1)
        flags = ("ignore_merges = true" in branch, "add_bos = true" in branch)
        names |= dict.fromkeys(re.findall(r'tokenizer_pre == "([^"]+)"', branch), (kind, *flags))
    return names


def test_every_pre_tokenizer_is_llama_cpps():
    """Each name splits with llama.cpp's regexes (or the tokenizer.json originals its source
    quotes) and carries its settings; the three places where llama.cpp splits in C++ code
    are written as regexes that cut the same way (checked against llama.cpp's own binary
    on the corpus when they were written)."""
    from pocketlm.tokenizer.pretokenize import GPT2, SPLITS

    source = (vendor.llama_cpp() / "src" / "llama-vocab.cpp").read_text(encoding="utf-8")
    unicode = (vendor.llama_cpp() / "src" / "unicode.cpp").read_text(encoding="utf-8")
    kimi = unicode.split("(from tokenization_kimi.py):\n// ", 1)[1].split("\n", 1)[0]
    in_code = {
        r"\p{Han}+": kimi,
        r"\p{AFMoE_digits}": r"\G[^\p{N}]*+\p{N}{1,3}(?=(?:\p{N}{3})*+(?!\p{N}))",
        r"(?=(\d{3})+(?!\d))": r"[0-9]{1,3}(?=(?:[0-9]{3})*(?![0-9]))",
    }
    regexes, names = llama_cpp_regexes(source), llama_cpp_names(source)
    # "whitespace" comes only with tokenizer model "whitespace", an embedding model's.
    assert set(SPLITS) == set(names) - {"whitespace"}
    for name, split in SPLITS.items():
        kind, ignore_merges, add_bos = names[name]
        expected, byte_level = regexes[kind]
        assert [_normal(r) for r in split.regexes] == [in_code.get(r, r) for r in expected], name
        assert (split.ignore_merges, split.byte_level) == (ignore_merges, byte_level), name
        # llama.cpp adds BOS for Gemma 4 even where the file says not.
        assert (split.add_bos, split.bos_always) == (add_bos or kind == "GEMMA4", kind == "GEMMA4")
    assert GPT2 in regexes["GPT2"][0]


# -- sentencepiece and tiktoken on the corpus -------------------------------------------------


def spm_metadata(processor: sentencepiece.SentencePieceProcessor) -> dict:
    """A SentencePiece model's pieces, scores and types as llama.cpp's converter writes them."""

    def kind(i: int) -> int:
        checks = [(processor.is_unknown, 2), (processor.is_control, 3)]
        checks += [(processor.is_unused, 5), (processor.is_byte, 6)]
        return next((k for check, k in checks if check(i)), 1)

    n = processor.get_piece_size()
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [processor.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [processor.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": processor.bos_id(),
        "tokenizer.ggml.eos_token_id": processor.eos_id(),
        "tokenizer.ggml.unknown_token_id": processor.unk_id(),
    }


@pytest.mark.parametrize("model", MISTRAL_MODELS)
def test_sentencepiece_corpus_matches_sentencepiece(model, lines):
    processor = sentencepiece.SentencePieceProcessor(
        model_file=str(vendor.mistral_tokenizers() / model)
    )
    hello = processor.encode("Hello world")  # a real vocabulary, not an empty one
    assert processor.get_piece_size() >= 32000 and len(hello) == 2
    tokenizer = Tokenizer.from_gguf_metadata(spm_metadata(processor))
    assert tokenizer.bos_id == 1 and tokenizer.add_bos and tokenizer.eos_ids == {2}
    mine, theirs = tokenizer.encode_batch(lines, add_bos=False), processor.encode(lines)
    wrong = [(line, a, b) for line, a, b in zip(lines, mine, theirs, strict=True) if a != b]
    assert not wrong, f"{len(wrong)} of {len(lines)} lines differ, first: {wrong[0]}"
    assert [tokenizer.decode(ids) for ids in mine] == lines
    assert processor.decode(mine) == lines


def test_tiktoken_llama3_corpus_matches_tiktoken(lines):
    ranks = load_tiktoken_bpe(str(vendor.llama3_tokenizer()))
    oracle = tiktoken.Encoding(
        "llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )
    assert oracle.encode("Hello world") == [9906, 1917]
    meta = read_metadata(golden_path("llama-bpe"))
    tokens = meta["tokenizer.ggml.tokens"]
    # The GGUF vocabulary is Llama 3's: the same bytes at every rank.
    assert all(bytes(BYTE_OF_CHAR[c] for c in tokens[rank]) == b for b, rank in ranks.items())
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    mine, theirs = tokenizer.encode_batch(lines, add_bos=False), oracle.encode_ordinary_batch(lines)
    wrong = [(line, a, b) for line, a, b in zip(lines, mine, theirs, strict=True) if a != b]
    assert not wrong, f"{len(wrong)} of {len(lines)} lines differ, first: {wrong[0]}"
    assert [tokenizer.decode(ids) for ids in mine] == lines


# -- what is refused, and how -----------------------------------------------------------------


def _tiny_bpe(**extra) -> dict:
    tokens = ["a", "b", "ab", "Ġ", "<|end|>"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens}
    meta |= {"tokenizer.ggml.token_type": [1, 1, 1, 1, 3], "tokenizer.ggml.merges": ["a b"]}
    return meta | extra


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer.ggml.model": "t5"}, "'t5' is T5's Unigram.*causal language models"),
        ({"tokenizer.ggml.model": "bert"}, "'bert' is BERT's WordPiece"),
        ({"tokenizer.ggml.model": "rwkv"}, "'rwkv' is not supported"),
        ({"tokenizer.ggml.model": None}, "None is not supported"),
        ({"tokenizer.ggml.pre": "jina-v2-en"}, "'jina-v2-en' belongs to a BERT-style encoder"),
        ({"tokenizer.ggml.pre": "no-such-split"}, "'no-such-split' is unknown to pocketlm"),
        ({"tokenizer.ggml.merges": None}, "merges is missing"),
        ({"tokenizer.ggml.merges": ["ab"]}, "merge 'ab' is not two tokens"),
        ({"tokenizer.ggml.merges": ["a c"]}, "merges are unusable"),
        ({"tokenizer.ggml.tokens": ["a", "a", "ab", "Ġ", "x"]}, "holds 'a' twice"),
        ({"tokenizer.ggml.tokens": [1, 2]}, "tokens is missing or not strings"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "token_type has fewer entries"),
        ({"tokenizer.ggml.token_type": ["1"] * 5}, "token_type holds non-numbers"),
        ({"tokenizer.ggml.scores": [0.0, "x", 0, 0, 0]}, "scores holds non-numbers"),
        ({"tokenizer.ggml.pre": 7}, "pre is not a string"),
    ],
)
def test_refusals_are_one_clear_line(change, message):
    meta = {k: v for k, v in _tiny_bpe(**change).items() if v is not None}
    with pytest.raises(PocketLMError, match=message) as caught:
        Tokenizer.from_gguf_metadata(meta)
    assert "\n" not in str(caught.value)


def test_tiny_bpe_builds_with_llama_cpps_default_split():
    tokenizer = Tokenizer.from_gguf_metadata(_tiny_bpe())
    assert tokenizer.encode("ab<|end|>a b") == [2, 4, 0, 3, 1]
    assert tokenizer.eos_ids == {4} and tokenizer.bos_id is None and not tokenizer.add_bos


# -- SentencePiece by hand --------------------------------------------------------------------


def _tiny_spm(**extra) -> dict:
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    pieces += ["▁", "h", "e", "l", "o", "▁h", "he", "▁he", "ll", "▁hell", "▁hello", "lo"]
    scores = [0.0] * 259 + [-1.0, -2, -3, -4, -5, -6, -7, -8, -9, -10, -11, -0.5]
    types = [2, 3, 3] + [6] * 256 + [1] * 12
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces}
    meta |= {"tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types}
    return meta | extra


def test_sentencepiece_merges_by_score():
    tokenizer = Tokenizer.from_gguf_metadata(_tiny_spm())
    # "lo" scores best (-0.5), so "▁hello" can never form: ▁he + l + lo.
    ids = tokenizer.encode("hello", add_bos=False)
    assert [tokenizer.token_bytes(i) for i in ids] == [b" he", b"l", b"lo"]
    assert tokenizer.decode(ids) == "hello" and tokenizer.encode("hello")[0] == 1
    # Characters outside the vocabulary become their UTF-8 bytes, and decode back.
    ids = tokenizer.encode("hé", add_bos=False)
    assert ids == [264, 3 + 0xC3, 3 + 0xA9] and tokenizer.decode(ids) == "hé"


def test_sentencepiece_without_prefix_space_and_with_eos_suffix():
    meta = _tiny_spm(**{"tokenizer.ggml.add_space_prefix": False})
    meta["tokenizer.ggml.add_eos_token"] = True
    meta["tokenizer.ggml.add_bos_token"] = False
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    assert tokenizer.encode("hello") == [265, 262, 270, 2]  # "he" "l" "lo" and EOS after
    assert tokenizer.encode("hello", add_bos=False) == [265, 262, 270]  # only by default
    assert tokenizer.decode([259, 265]) == " he"  # no prefix space to take off
