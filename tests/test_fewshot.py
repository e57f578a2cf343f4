"""Few-shot prompting: the exact prompt text, stopping at the next example, file errors."""

from pathlib import Path

import pytest
import torch

import pocketlm
from checkpoints import hf_model
from pocketlm.cli.main import main
from pocketlm.errors import PocketLMError
from pocketlm.prompting.fewshot import Example, FewShot, load_examples
from scripted_model import make_scripted_gpt2

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_prompt_from_the_shipped_qa_file_is_exactly_the_pattern():
    shots = FewShot.from_file(EXAMPLES / "qa.jsonl")
    assert shots.prompt("What is the capital of Peru?") == (
        "Q: What is the capital of Italy?\nA: Rome\n\n"
        "Q: What is the capital of Japan?\nA: Tokyo\n\n"
        "Q: What is the capital of Kenya?\nA: Nairobi\n\n"
        "Q: Who wrote Romeo and Juliet?\nA: William Shakespeare\n\n"
        "Q: How many legs does a spider have?\nA: 8\n\n"
        "Q: What is the capital of Peru?\nA:"  # no trailing space: " Lima" is one token
    )
    assert shots.stops == ["\n\n", "\nQ:"]


def test_yaml_file_brings_its_template_and_a_user_template_overrides_it(tmp_path):
    shots = FewShot.from_file(EXAMPLES / "translate.yaml")
    assert shots.template == "English: {input}\nFrench: {output}"
    assert shots.examples[0] == Example("Hello.", "Bonjour.")
    assert shots.prompt("Hello.").endswith("Où est la bibliothèque ?\n\nEnglish: Hello.\nFrench:")
    assert shots.stops == ["\n\n", "\nEnglish:"]
    file = tmp_path / "pairs.yaml"
    file.write_text("- question: 2+2?\n  answer: 4\n- {question: '{x}', answer: '}'}\n")
    custom = FewShot.from_file(file, template="{input} => {output}", separator="\n")
    # Braces in examples are text, not format fields; a template without a lead stops at
    # the separator only.
    assert custom.prompt("3+3?") == "2+2? => 4\n{x} => }\n3+3? =>"
    assert custom.stops == ["\n"]


def test_question_answer_keys_and_python_pairs_are_accepted(tmp_path):
    file = tmp_path / "qa.jsonl"
    file.write_text('{"question": "a?", "answer": "b"}\n\n{"prompt": "c?", "completion": 1}\n')
    assert load_examples(file).examples == [Example("a?", "b"), Example("c?", "1")]
    assert FewShot.build([("a?", "b"), {"input": "c?", "output": "d"}]).prompt("e?") == (
        "Q: a?\nA: b\n\nQ: c?\nA: d\n\nQ: e?\nA:"
    )


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "bad.jsonl",
            '{"input": "a", "output": "b"}\n\n{"input": "c", "output": }\n',
            "bad.jsonl:3: not valid JSON",
        ),
        (
            "missing.jsonl",
            '{"input": "a", "output": "b"}\n{"input": "c"}\n',
            "missing.jsonl:2: the example has 'input' but no 'output'",
        ),
        (
            "keys.jsonl",
            '{"q": "a", "a": "b"}\n',
            "keys.jsonl:1: an example needs 'input' and 'output'",
        ),
        ("list.jsonl", '["a", "b"]\n', "list.jsonl:1: an example must be a mapping"),
        (
            "nested.jsonl",
            '{"input": "a", "output": ["b"]}\n',
            "nested.jsonl:1: 'input' and 'output' must be text",
        ),
        ("empty.jsonl", "\n\n", "empty.jsonl: holds no examples"),
        (
            "bad.yaml",
            "examples:\n  - input: a\n    output: b\n  - input: [c\n",
            "bad.yaml:5: not valid YAML",
        ),
        (
            "missing.yaml",
            "examples:\n  - input: a\n    output: b\n\n  - answer: c\n",
            "missing.yaml:5: the example has 'answer' but no 'question'",
        ),
        ("scalar.yaml", "just text\n", "scalar.yaml: expected a list of examples"),
        (
            "template.yaml",
            "template: 'Q: {input}'\nexamples:\n  - {input: a, output: b}\n",
            "needs {input} and {output} once each",
        ),
        ("notes.txt", "Q: a\nA: b\n", "notes.txt: examples must be .jsonl or .yaml"),
    ],
)
def test_malformed_files_name_the_file_and_line(tmp_path, name, text, message):
    file = tmp_path / name
    file.write_text(text)
    with pytest.raises(PocketLMError) as error:
        load_examples(file)
    assert str(error.value).startswith(str(tmp_path)) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_file_and_bad_template_are_one_line_errors(tmp_path):
    with pytest.raises(PocketLMError, match="no such examples file"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(PocketLMError, match="must come before"):
        FewShot((Example("a", "b"),), template="{output} <- {input}")


@pytest.fixture(scope="module")
def oracle_lm(tmp_path_factory):
    """A GPT-2 that, after ":", says " Lima" then starts the next example after a blank
    line; after " is" it says " Paris" and starts the next example after a single newline."""
    folder = make_scripted_gpt2(
        tmp_path_factory.mktemp("fewshot") / "gpt2",
        [":", " Lima", "\n\n", "Q", ":"],
        [" is", " Paris", "\n", "Q"],
    )
    return folder, pocketlm.load(folder, device="cpu")


def hf_greedy(folder: Path, lm: pocketlm.LM, prompt: str, n: int) -> str:
    """The oracle: transformers, greedy, on the same weights."""
    ids = torch.tensor([lm.tokenizer.encode(prompt)])
    out = hf_model(folder).generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return lm.tokenizer.decode(out[0, ids.shape[1] :].tolist())


def test_generation_stops_at_the_blank_line_before_the_next_example(oracle_lm):
    folder, lm = oracle_lm
    shots = FewShot.build([("What is the capital of Italy?", "Rome")])
    prompt = shots.prompt("What is the capital of Peru?")
    assert hf_greedy(folder, lm, prompt, 6) == " Lima\n\nQ: Lima\n\n"
    chunks = list(shots.stream(lm, "What is the capital of Peru?", temperature=0))
    assert "".join(c.text for c in chunks).strip() == "Lima"
    assert chunks[-1].stats.new_tokens == 2  # " Lima" and the "\n\n" that ended it
    assert (
        lm.few_shot(
            "What is the capital of Peru?",
            [("What is the capital of Italy?", "Rome")],
            temperature=0,
        )
        == "Lima"
    )


def test_generation_stops_at_a_new_line_that_opens_the_next_example(oracle_lm):
    folder, lm = oracle_lm
    shots = FewShot.build([("Italy", "Rome")], template="Q: {input} is {output}")
    assert shots.prompt("France") == "Q: Italy is Rome\n\nQ: France is"
    assert hf_greedy(folder, lm, shots.prompt("France"), 6) == " Paris\nQ: Lima\n\n"
    chunks = list(shots.stream(lm, "France", temperature=0))
    assert "".join(c.text for c in chunks).strip() == "Paris"
    assert chunks[-1].stats.new_tokens == 4  # " Paris", "\n", "Q", ":"
    # Without the template's lead only the blank line ends it.
    assert (
        FewShot.build([("Italy", "Rome")], template="{input} is {output}").answer(
            lm, "France", temperature=0
        )
        == "Paris\nQ: Lima"
    )


def test_the_examples_are_computed_once_across_questions_in_a_session(oracle_lm, tmp_path):
    session = oracle_lm[1].session()  # a cache of our own, empty
    file = tmp_path / "qa.jsonl"
    file.write_text('{"input": "What is the capital of Italy?", "output": "Rome"}\n' * 4)
    shots = FewShot.from_file(file)
    peru = list(shots.stream(session, "What is the capital of Peru?", temperature=0))
    chile = list(shots.stream(session, "What is the capital of Chile?", temperature=0))
    assert [peru[0].text, chile[0].text] == ["Lima", "Lima"]
    first, lm = peru[-1].stats.prefilled_tokens, oracle_lm[1]
    # Only the new question is computed: the tokens after the shared prefix of the prompts.
    a = lm.tokenizer.encode(shots.prompt("What is the capital of Peru?"))
    b = lm.tokenizer.encode(shots.prompt("What is the capital of Chile?"))
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert first == len(a) and chile[-1].stats.prefilled_tokens == len(b) - shared


def test_run_examples_answers_from_the_command_line(oracle_lm, tmp_path, capsys):
    folder = str(oracle_lm[0])
    file = tmp_path / "qa.jsonl"
    file.write_text('{"input": "What is the capital of Italy?", "output": "Rome"}\n')
    # Options go before MODEL PROMPT or after them (argparse cannot split the positionals).
    argv = ["run", "--examples", str(file), "-t", "0", folder, "What is the capital of Peru?"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "Lima\n"
    template = "Q: {input} is {output}"
    argv = ["run", "--examples", str(file), "--template", template, "-t", "0", folder, "France"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "Paris\n"
    file.write_text('{"input": "a", "output": "b"}\n{"input": "c"}\n')
    assert main(["run", folder, "x", "--examples", str(file)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {file}:2: the example has 'input' but no 'output'\n"
