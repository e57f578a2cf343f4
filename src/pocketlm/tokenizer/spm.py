"""SentencePiece-style vocabularies as `tokenizers` BPE models: spaces written "▁", bytes
missing from the vocabulary written as `<0xXX>` byte pieces.

A GGUF "llama" vocabulary (Llama 1/2, Mistral, Phi-3, Gemma 1-3...) carries pieces and
scores, no merges: llama.cpp tokenizes it by merging, again and again, the adjacent pair
whose joined piece scores highest (ties to the leftmost). A BPE whose merges are ranked by
that score does the same, which is how transformers' `LlamaConverter` turns a
`tokenizer.model` into a tokenizer.json; `score_merges` builds that list. Gemma 4's GGUF
ships real merges over the same kind of pieces. Knows nothing of files or of GGUF keys.

References: llama.cpp `llama-vocab.cpp` (`llm_tokenizer_spm_session`, `tokenize` with
`add_space_prefix`, `token_to_piece`), transformers `convert_slow_tokenizer.py`
(`SentencePieceExtractor`, `LlamaConverter`), sentencepiece `bpe_model.cc`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers

from pocketlm.tokenizer.decoding import SPACE_MARK


def score_merges(
    tokens: Sequence[str], scores: Sequence[float], vocab: Mapping[str, int]
) -> list[tuple[str, str]]:
    """Every way to cut each piece in two known pieces, best-scoring joined piece first;
    equal scores keep vocabulary order (as transformers' SentencePieceExtractor ranks them)."""
    ranked = []
    for index, piece in enumerate(tokens):
        cuts = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        cuts = [(vocab[a], vocab[b], a, b) for a, b in cuts if a in vocab and b in vocab]
        ranked.extend((-scores[index], index, ia, ib, a, b) for ia, ib, a, b in sorted(cuts))
    ranked.sort(key=lambda merge: merge[:4])
    return [(a, b) for *_, a, b in ranked]


def spm_bpe_backend(
    vocab: Mapping[str, int],
    merges: list[tuple[str, str]],
    *,
    unk_token: str | None,
    add_space_prefix: bool,
    ignore_merges: bool = False,
) -> Backend:
    """A BPE over "▁"-spelled pieces with byte fallback. `add_space_prefix`: a space goes
    before the text (and before each stretch after a special token), and one leading space
    is dropped when decoding, as llama.cpp and transformers' Llama tokenizer do."""
    model = models.BPE(
        dict(vocab),
        merges,
        unk_token=unk_token,
        fuse_unk=unk_token is not None,
        byte_fallback=True,
        ignore_merges=ignore_merges,
    )
    backend = Backend(model)
    steps = [normalizers.Prepend(SPACE_MARK)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE_MARK)])
    tail = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse(), *tail]
    )
    return backend
