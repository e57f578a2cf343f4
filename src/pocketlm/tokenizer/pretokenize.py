r"""How each BPE vocabulary cuts text into words before merging: the GGUF `tokenizer.ggml.pre`
names llama.cpp knows, each as the regexes it applies in turn (every match and every stretch
between matches becomes a word, and the next regex cuts each word again), and the settings
llama.cpp attaches to the name (merges skipped for whole-word tokens, BOS by default, raw
UTF-8 words with "▁" for spaces instead of GPT-2's byte alphabet).

Where llama.cpp rewrote a model's regex for C++'s std::regex (`(?i:'s)` as `'[sS]`, GPT-4o's
letter classes as lookaheads over ASCII) and quotes the original, this table keeps the
original from the model's tokenizer.json: the `tokenizers` library runs that regex itself, so
the words are the model's own (llama.cpp's rewrites lose case changes and combining marks
outside ASCII). Elsewhere it is llama.cpp's regex. Where llama.cpp cuts in C++ code (Kimi K2,
AFMoE's digit groups) or with an empty match (SuperBPE), the same cut is written as a regex.
Knows nothing of vocabularies or files.

Reference: llama.cpp `src/llama-vocab.cpp` (`llm_tokenizer_bpe`, the names in `load`),
`src/unicode.cpp` (`unicode_regex_split`), `convert_hf_to_gguf.py` (`get_vocab_base_pre`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Regex, pre_tokenizers

from pocketlm.errors import PocketLMError

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
# GPT-2's split (its encoder.py), as llama.cpp writes it: without the last "|\s+", whose
# single whitespace characters stay words of their own anyway.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama 3's split (its tokenizer.json); Qwen2's has every digit alone.
LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
# Qwen 3.5: letters keep their combining marks.
QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Jais 2: Llama 3's, with whitespace runs cut in powers of two.
JAIS2 = LLAMA3.replace(
    r"|\s+(?!\S)|\s+",
    "".join(rf"|\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4))
    + r"|\s{1,2}(?!\S)|\s{1}",
)
# GPT-4o (o200k): words split at case changes, contractions kept on the word.
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Mistral's Tekken: GPT-4o's without contractions, every digit alone.
TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Granite embedding (97m): llama.cpp's own form of GPT-4o's, case told by ASCII alone.
_NOT_LOWER, _NOT_UPPER = r"((?=[\p{L}\p{M}])([^a-z]))", r"((?=[\p{L}\p{M}])([^A-Z]))"
GRANITE_EMB = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_NOT_LOWER}*{_NOT_UPPER}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_NOT_LOWER}+{_NOT_UPPER}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Kimi K2: Han runs alone, and no Han character inside the GPT-4o letter classes.
_NO_HAN = r"&&[^\p{Han}]"
KIMI_K2 = (
    rf"[\p{{Han}}]+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER[:-1]}{_NO_HAN}]*{_LOWER[:-1]}{_NO_HAN}]+"
    rf"{_CONTRACTIONS}?|[^\r\n\p{{L}}\p{{N}}]?{_UPPER[:-1]}{_NO_HAN}]+{_LOWER[:-1]}{_NO_HAN}]*"
    rf"{_CONTRACTIONS}?|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek V3 (and Hunyuan dense, JoyAI, HY v4): digits by three, CJK runs, then words.
_DEEPSEEK3_WORDS = (
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CJK = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
# DeepSeek LLM's letters (Latin, Greek, Cyrillic, Armenian, Georgian... as llama.cpp lists
# them), written as escapes: some are canonically equivalent to others, and an editor that
# normalizes text would merge them. Its CJK class runs from U+0800 to U+4E00 on purpose.
_DEEPSEEK_LETTERS = (
    "\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
    "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3"
    "\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115"
    "\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
# Cohere's (Tiny Aya) numbers in groups of three from the right.
_THOUSANDS = r"\d{1,3}(?=(?:\d{3})*\b)"
# Runs of newlines and runs of anything else.
_NEWLINES = r"[^\n]+|[\n]+"
# BLOOM: a word is anything up to a space or sentence punctuation.
BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"


@dataclass(frozen=True)
class Split:
    """One `tokenizer.ggml.pre`: the regexes applied in turn, and llama.cpp's settings."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is a token is taken whole (Llama 3)
    add_bos: bool = False  # BOS first unless the file says otherwise
    byte_level: bool = True  # False: raw UTF-8 words, spaces as "▁", <0xXX> byte tokens
    bos_always: bool = False  # BOS even where the file says not (llama.cpp, for Gemma 4)


def _split(*regexes: str, **settings: bool) -> Split:
    return Split(regexes, **settings)


_LLAMA3 = _split(LLAMA3, ignore_merges=True, add_bos=True)
_GPT2 = _split(GPT2)
_DIGITS_THEN_GPT2 = _split(r"\p{N}", GPT2)
_QWEN2 = _split(QWEN2)
_GPT4O = _split(GPT4O)
_DEEPSEEK3 = _split(r"\p{N}{1,3}", _CJK, _DEEPSEEK3_WORDS)
_TINY_AYA = _split(_THOUSANDS, GPT4O)
_BAILING = _split(
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"
    r"|\s*[\r\n]|\s+(?!\S)|\s+"
)
# Gemma 4 and Sarvam: words of "▁"-spelled pieces, cut only where newlines begin and end.
_GEMMA4 = _split(_NEWLINES, byte_level=False, add_bos=True, bos_always=True)

SPLITS: dict[str, Split] = {
    # llama.cpp's own fallback for a BPE file without a pre-tokenizer name.
    "default": _split(r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0"),
        _LLAMA3,
    ),
    **dict.fromkeys(("lfm2", "jina-v5-nano"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe", "chatglm-bpe"), _split(LLAMA3)),
    **dict.fromkeys(("glm4", "glm5"), _split(LLAMA3, ignore_merges=True)),
    "jais-2": _split(JAIS2),
    "deepseek-llm": _split(
        r"[\r\n]",
        r"\s?[A-Za-z" + _DEEPSEEK_LETTERS + "]+",
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        r"\s+$",
        _DEEPSEEK_CJK,
        r"\p{N}+",
    ),
    "deepseek-coder": _split(r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}"),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), _DEEPSEEK3),
    "spark2_5": _split(
        r"\p{N}{1,3}",
        _CJK,
        _DEEPSEEK3_WORDS.replace(r"[\r\n]*|\s*[\r\n]+", r"|[\r\n]"),
        r"\p{N}",
    ),
    "youtu": _split(
        "[\uac00-\ud7a3\u3131-\u318e]+"
        "|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c\u3001-\u303f\ufe30-\ufe4f]+"
        "|[\u3105-\u312f]+|" + _CJK,
        GPT4O.replace(r"\p{N}{1,3}", r"\p{N}"),
        ignore_merges=True,
    ),
    "falcon": _split(r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"),
    **dict.fromkeys(
        ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
        _DIGITS_THEN_GPT2,
    ),
    "mellum2": _DIGITS_THEN_GPT2,
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es"), _GPT2),
    **dict.fromkeys(("jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "jina-v1-en"), _GPT2),
    **dict.fromkeys(("jina-v2-code", "roberta-bpe", "exaone4", "mpt", "olmo", "jais"), _GPT2),
    **dict.fromkeys(("trillion", "granite-docling"), _GPT2),
    **dict.fromkeys(("gemma4", "granite-embed-multi-311m"), _GEMMA4),
    "sarvam-moe": _split(_NEWLINES, byte_level=False),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    **dict.fromkeys(("stablelm2", "hunyuan", "solar-open", "grok-2"), _QWEN2),
    "qwen35": _split(QWEN35),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), _split(BLOOM)),
    "viking": _split(BLOOM, r"\p{N}"),
    "tekken": _split(TEKKEN, ignore_merges=True, add_bos=True),
    "chameleon": _split(
        r"<sentinel:[0-9]+>",
        r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
        r"([\t\n]|    |  )",
        r"\p{N}",
        r"[\p{P}!-/:-@\[-`{-~]",
        GPT2,
        add_bos=True,
    ),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
    "granite-embed-multi-97m": _split(GRANITE_EMB, ignore_merges=True),
    **dict.fromkeys(("tiny_aya", "cohere2moe"), _TINY_AYA),
    "kimi-k2": _split(KIMI_K2),
    # SuperBPE words span spaces; only numbers are cut, in threes from the right.
    "superbpe": _split(r"\p{N}+", r"[0-9]{1,3}(?=(?:[0-9]{3})*(?![0-9]))"),
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), _BAILING),
    "seed-coder": _split(
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "ufakzeka": _split(QWEN2.removeprefix(_CONTRACTIONS + "|")),
    "afmoe": _split(
        # llama.cpp's AFMoE digits (C++ code there): a cut after each group of three counted
        # from a number's end; what comes before the first group stays in its word (the next
        # regexes cut it off, but for a space whose lookahead then sees the digit).
        r"\G[^\p{N}]*+\p{N}{1,3}(?=(?:\p{N}{3})*+(?!\p{N}))",
        # CJK and other Asian scripts, as llama.cpp lists them (its U+8C48 is U+F900 after
        # Unicode normalization, and is kept: the range is llama.cpp's).
        "[\u4e00-\u9fff\u3400-\u4dbf\u8c48-\ufaff\u3040-\u309f\u30a0-\u30ff\uff65-\uff9f"
        "\u2f00-\u2fdf\u0e40-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f\uaa60-\uaa7f"
        "\ua9e0-\ua9ff\uac00-\ud7af\u1100-\u11ff]+",
        _DEEPSEEK3_WORDS,
    ),
    "laguna": _split(_NEWLINES, QWEN2),
    "exaone-moe": _split(
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
    ),
    "minicpm5": _split(r"\p{N}{1,3}", LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}+"), ignore_merges=True),
}

# Vocabularies of encoder models: BERT's WordPiece (llama.cpp's WPM), named by the converter.
ENCODER_NAMES = frozenset({"bert-bge", "bert-bge-large", "jina-v2-en"})


def split_for(name: str) -> Split:
    """The split a `tokenizer.ggml.pre` name stands for; a clear error for any other."""
    if name in SPLITS:
        return SPLITS[name]
    if name in ENCODER_NAMES:
        raise PocketLMError(
            f"GGUF pre-tokenizer {name!r} belongs to a BERT-style encoder (embeddings), "
            "not a causal language model; pocketlm runs causal language models"
        )
    raise PocketLMError(
        f"GGUF pre-tokenizer {name!r} is unknown to pocketlm (it knows the {len(SPLITS)} "
        "names llama.cpp knows); use the model's Hugging Face folder with tokenizer.json instead"
    )


def pre_tokenizer(split: Split) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer that cuts words as `split` says (then spells their bytes
    in GPT-2's alphabet, for a byte-level vocabulary)."""
    cuts = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in split.regexes]
    if split.byte_level:
        cuts.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(cuts)
