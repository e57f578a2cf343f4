"""The grammar state (pocketlm.generate.constraint) on a hand-built BPE vocabulary of 16
tokens, with the exact set of tokens each position allows, worked out by hand."""

import pytest
import torch
from tokenizers import AddedToken, models
from tokenizers import Tokenizer as Backend

from pocketlm.errors import PocketLMError
from pocketlm.generate.constraint import Grammar, json_rule
from pocketlm.tokenizer import Tokenizer

PIECES = ["<eos>", "{", "}", '"', "a", "b", ":", ",", "1", "2", " ", "x", '{"', "ab", '"}', "1}"]
MERGES = [("{", '"'), ("a", "b"), ('"', "}"), ("1", "}")]  # how the last four are made
ID = {piece: i for i, piece in enumerate(PIECES)}
EOS = ID["<eos>"]
V = 20  # the model's logits: 4 more than the tokenizer has (a padded embedding)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    # llguidance tokenizes text the grammar forces with it (to allow its canonical tokens)
    backend = Backend(models.BPE(dict(ID), MERGES))
    backend.add_special_tokens([AddedToken("<eos>", special=True)])
    return Tokenizer(backend, eos_ids=frozenset({EOS}))


def allowed(state) -> set[str]:
    return {PIECES[i] for i in state.allowed("cpu").nonzero()[:, 0].tolist()}


def walk(state, pieces):
    """The allowed set before each piece, then after the last."""
    seen = []
    for piece in pieces:
        seen.append(allowed(state))
        state.accept(ID[piece])
    seen.append(allowed(state))
    return seen


SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}},
    "required": ["a"],
    "additionalProperties": False,
}


def test_json_schema_masks_step_by_step(tok):
    state = Grammar.json_schema(SCHEMA).bind(tok, vocab_size=V).start()
    masks = walk(state, ['{"', "a", '"', ":", "1", "2", "}"])
    # `{"a":` is forced; forced text is allowed in its canonical tokens only (as the
    # tokenizer would write it: '{"', not "{" then '"'), so the model stays in distribution
    assert masks == [
        {'{"'},
        {"a"},  # the only property; "ab" would name another
        {'"'},  # the key ends ('"}' would skip the value)
        {":"},
        {"1", "2", "1}"},  # an integer (no free whitespace); "1}" is a digit and the end
        {"1", "2", "1}", "}"},  # more digits, or the end: "," would start a 2nd property
        {"1", "2", "1}", "}"},
        {"<eos>"},  # complete: only end-of-text
    ]
    assert state.done


def test_apply_sets_forbidden_and_padded_ids_to_minus_inf(tok):
    state = Grammar.json_schema(SCHEMA).bind(tok, vocab_size=V).start()
    logits = torch.arange(V, dtype=torch.float32)
    masked = state.apply(logits)
    keep = {ID['{"']}
    assert masked.shape == (V,)
    assert [i for i in range(V) if masked[i] != float("-inf")] == sorted(keep)
    assert all(masked[i] == logits[i] for i in keep)
    assert logits[0] == 0  # the input is left as it was


def test_enum_and_any_json_object(tok):
    state = Grammar.json_schema({"enum": ["ab", "b"]}).bind(tok, vocab_size=V).start()
    assert walk(state, ['"', "ab"]) == [{'"'}, {"a", "ab", "b"}, {'"'}]
    state = Grammar.json_object().bind(tok, vocab_size=V).start()
    assert allowed(state) == {"{", '{"'}  # "{}" or a first key: nothing is forced
    for piece in ['{"', "x", '"', ":", "1", "}"]:
        state.accept(ID[piece])
    assert state.done and allowed(state) == {"<eos>"}


def test_lark_mixes_free_text_and_json(tok):
    # free text of a/b, or "x" then JSON under SCHEMA: the tool-call shape
    grammar = Grammar.lark(f'start: /[ab]+/ | "x" call\ncall: {json_rule(SCHEMA)}')
    state = grammar.bind(tok, vocab_size=V).start()
    assert allowed(state) == {"a", "b", "ab", "x"}
    text = state.fork()
    assert walk(text, ["ab", "a"])[-1] == {"a", "b", "ab", "<eos>"}  # text may end or go on
    assert allowed(state) == {"a", "b", "ab", "x"}  # the fork did not move the original
    # past free text, forced JSON may start in any spelling ("{" then '"', or '{"')
    assert walk(state, ["x"])[-1] == {"{", '{"'}


def test_gbnf_and_regex(tok):
    state = Grammar.gbnf('root ::= "a" ("b" | "1")').bind(tok, vocab_size=V).start()
    assert walk(state, ["a", "1"]) == [{"a", "ab"}, {"b", "1"}, {"<eos>"}]
    state = Grammar.regex("[12]{2}").bind(tok, vocab_size=V).start()
    assert walk(state, ["2", "1"]) == [{"1", "2"}, {"1", "2"}, {"<eos>"}]


def test_rollback_returns_to_the_earlier_mask(tok):
    state = Grammar.json_schema(SCHEMA).bind(tok, vocab_size=V).start()
    for piece in ['{"', "a", '"', ":"]:
        state.accept(ID[piece])
    state.rollback(3)
    assert allowed(state) == {"a"}


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Grammar.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
        (lambda: Grammar.json_schema({"not": {"type": "string"}}), '"not"'),
        (lambda: Grammar.json_schema({"type": "strin"}), "Invalid type: strin"),
        (lambda: Grammar.json_schema({"$ref": "#/$defs/Nope"}), "/$defs/Nope"),
        (lambda: Grammar.json_schema(["not", "a", "schema"]), "must be a dict"),
        (lambda: Grammar.lark("start: missing_rule"), 'unknown name: "missing_rule"'),
        (lambda: Grammar.gbnf("root ::= ("), "the GBNF grammar cannot be used"),
    ],
)
def test_unusable_grammars_are_one_line_errors(build, message):
    with pytest.raises(PocketLMError) as error:
        build()
    assert message in str(error.value) and "\n" not in str(error.value)
