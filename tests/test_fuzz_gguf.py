"""A short run of the GGUF fuzzer (benchmarks/fuzz_loaders.py): 200 malformed files.

Every case must end in a one-line PocketLMError or load cleanly; the full run (thousands
of cases) is `python benchmarks/fuzz_loaders.py --cases 20000`.
"""

import importlib.util
from pathlib import Path

FUZZER = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_loaders.py"


def load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_loaders", FUZZER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_gguf_reader(tmp_path):
    fuzzer = load_fuzzer()
    report = fuzzer.fuzz(cases=200, seed=0, folder=tmp_path, timeout=10.0)
    assert report.failures == [], report.summary()
    assert report.cases == 200
    # The mutations reach past the header checks: some files still load, and the errors
    # come from many different checks (counts, lengths, types, offsets, shapes, config).
    assert report.outcomes["ok"] > 0, report.summary()
    assert len(report.outcomes) > 15, report.summary()


def test_fuzzer_replays_a_case(tmp_path):
    fuzzer = load_fuzzer()
    seed = fuzzer.load_seed(fuzzer.write_gpt2_seed(tmp_path / "gpt2.gguf"))
    first = fuzzer.mutate(seed, fuzzer.random.Random("0:5"))
    assert fuzzer.mutate(seed, fuzzer.random.Random("0:5")) == first
