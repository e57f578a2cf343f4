"""A tiny GPT-2 whose greedy continuation is written in advance, for chat and few-shot tests.

A random model says nothing in particular, so it cannot show that generation stops at the
next "\\nUser:". This one is a real GPT-2 checkpoint (HF layout, the real vocabulary, untied
head) built so that the next token depends on the current token only: the blocks' output
projections and the position embeddings are zero, so the final hidden state after token a is
h_a = ln_f(wte[a]), and for each scripted pair a -> b the head row of b gets a large multiple
of h_a. Greedy decoding then walks the script. `transformers` on the same files is the oracle
that it really does (see test_chat.py).
"""

from pathlib import Path

import torch

from checkpoints import hf_model, make_gpt2
from pocketlm.tokenizer import Tokenizer


def token_script(pieces: list[str]) -> dict[int, int]:
    """Consecutive single-token pieces as a next-token table: ["A", "B", "C"] -> A->B, B->C."""
    tokenizer = Tokenizer.gpt2()
    ids = []
    for piece in pieces:
        encoded = tokenizer.encode(piece)
        assert len(encoded) == 1, f"{piece!r} is {len(encoded)} GPT-2 tokens, not one"
        ids.append(encoded[0])
    script: dict[int, int] = {}
    for a, b in zip(ids, ids[1:], strict=False):
        assert script.setdefault(a, b) == b, f"token {a} is scripted to two successors"
    return script


def make_scripted_gpt2(folder: Path, *chains: list[str], n_positions: int = 256) -> Path:
    """A GPT-2 (n_embd 64, 2 layers) whose greedy next token follows `chains` of pieces."""
    script: dict[int, int] = {}
    for chain in chains:
        for a, b in token_script(chain).items():
            assert script.setdefault(a, b) == b, f"token {a} is scripted to two successors"
    make_gpt2(folder, n_positions=n_positions, tie_word_embeddings=False)
    model = hf_model(folder)
    with torch.no_grad():
        for block in model.transformer.h:
            for projection in (block.attn.c_proj, block.mlp.c_proj):
                projection.weight.zero_()
                projection.bias.zero_()
        model.transformer.wpe.weight.zero_()
        hidden = model.transformer.ln_f(model.transformer.wte.weight)  # (V, C)
        for a, b in script.items():
            # logit_b after a = 40 * |h_a| (about 320); unrelated logits stay near 0.
            model.lm_head.weight[b] += 40 * hidden[a] / hidden[a].norm()
    model.save_pretrained(folder)
    return folder
