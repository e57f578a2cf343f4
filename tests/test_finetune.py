"""`pocketlm finetune`: memorisation, exact resume, kill safety, LoRA, DDP, masking, bad data,
and an output folder that `transformers` loads with the same logits.

Most tests use a tiny GPT-2 (n_embd 64, 2 layers) with a small byte-level BPE trained on
the corpus (320 tokens), so that the output layer, not the test, is cheap; the export test
uses the real GPT-2 vocabulary. Oracles: `transformers` for logits and tokenization,
hand-built label masks, and runs that must agree with each other bit for bit (resume) or
to float tolerance (DDP, merged LoRA).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import hf_model, make_gpt2, make_llama
from pocketlm.cli.main import main as cli
from pocketlm.errors import PocketLMError
from pocketlm.train import checkpoint
from pocketlm.train.data import IGNORE, load_dataset
from pocketlm.train.finetune import FinetuneJob, finetune
from pocketlm.train.lora import LoRAConfig, apply_lora, lora_modules, merge_lora
from pocketlm.train.trainer import TrainConfig, Trainer
from pocketlm.weights import loader

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be or not to be, that is the question.",
]
ROOT = Path(__file__).resolve().parents[1]


def make_tiny_tokenizer(folder: Path) -> int:
    """A byte-level BPE of 320 tokens trained on SENTENCES, in HF layout; its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    names = dict.fromkeys(("bos_token", "eos_token", "unk_token"), "<|endoftext|>")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster than two, and far steadier on a busy
    machine (a parallel region waits for its slowest thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    vocab = make_tiny_tokenizer(folder)
    return make_gpt2(
        folder,
        with_tokenizer=False,
        vocab_size=vocab,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    file = tmp_path_factory.mktemp("data") / "corpus.txt"
    file.write_text("\n".join(SENTENCES * 8) + "\n")
    return file


def job(
    model: Path, data: Path, out: str, tmp: Path, *, block_size: int = 16, **train
) -> FinetuneJob:
    settings = dict(steps=6, batch_size=4, lr=1e-2, warmup=2, eval_every=0, save_every=0)
    return FinetuneJob(
        model=str(model),
        data=data,
        out=out,
        block_size=block_size,
        val_fraction=0.2,
        run_dir=tmp / f"run-{out}",
        train=TrainConfig(**{**settings, **train}),
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# -- learning, and the exported folder --


def test_memorises_a_small_corpus(tiny, corpus, tmp_path, pocketlm_home):
    import pocketlm

    settings = dict(block_size=32, steps=40, batch_size=8, eval_every=10, sample_every=20)
    result = finetune(job(tiny, corpus, "memo", tmp_path, sample_prompt="A journey", **settings))
    # Chance is ln(320) = 5.8 nats; a model that has the three sentences by heart is far below 1.
    assert result.reason == "done" and result.val_loss < 0.5
    lm = pocketlm.load("memo")
    text = lm.generate("A journey", max_tokens=24, temperature=0).text
    assert text.startswith(" of a thousand miles begins with a single step.")
    records = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 4 and val[-1] < val[0]
    samples = [r["sample"] for r in records if "sample" in r]
    assert len(samples) == 2 and samples[-1].startswith("A journey" + text[:48])
    assert (result.run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("arch", "lora"),
    [("gpt2", False), ("llama", True), ("llama-tied", False)],
    ids=["gpt2-full", "llama-lora-merged", "llama-tied-full"],
)
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, pocketlm_home, arch, lora):
    from transformers import AutoTokenizer

    import pocketlm

    # The real GPT-2 vocabulary (vocab.json + merges.txt) beside both architectures.
    if arch == "gpt2":
        base, probe = make_gpt2(tmp_path / "base"), "transformer.h.0.attn.c_attn.weight"
    else:
        base = make_llama(tmp_path / "base", tie_word_embeddings=arch == "llama-tied")
        probe = "model.layers.0.self_attn.q_proj.weight"
    data = tmp_path / "notes.txt"
    data.write_text(" ".join(SENTENCES))
    settings = job(base, data, "exported", tmp_path, steps=2, batch_size=2, lr=1e-2)
    settings.lora = LoRAConfig(rank=4, alpha=8) if lora else None
    finetune(settings)
    folder = pocketlm_home / "models" / "exported"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]  # a sane oracle
    ours = pocketlm.load("exported")
    ids = torch.tensor([tokenizer("A journey of a thousand miles")["input_ids"]])
    with torch.no_grad():
        expected = hf_model(folder)(ids).logits
        got = ours.model(ids, torch.arange(ids.shape[1])[None])
    assert torch.allclose(got, expected, atol=1e-4)
    # It was trained (with LoRA: the merged update reached the base weights).
    assert (weights(folder)[probe] - weights(base)[probe]).abs().max() > 1e-3
    assert not any("lora" in name for name in weights(folder))


def test_tied_embeddings_stay_tied_while_training(tiny, corpus, tmp_path):
    loaded = loader.load(tiny)
    model = loaded.model.requires_grad_(True)
    data = load_dataset(corpus, loaded.tokenizer, block_size=16, context_length=64)
    config = TrainConfig(steps=2, batch_size=2, lr=1e-2, save_every=0, eval_every=0)
    Trainer(
        model, tokenizer=loaded.tokenizer, dataset=data, config=config, run_dir=tmp_path
    ).train()
    assert model.lm_head.weight is model.transformer.wte.weight


# -- resume and kill safety --


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-with-dropout"])
def test_resume_gives_the_same_weights_as_one_run(tiny, corpus, tmp_path, pocketlm_home, lora):
    straight = job(tiny, corpus, "straight", tmp_path, steps=8, grad_accum=2)
    first = job(tiny, corpus, "resumed", tmp_path, steps=8, grad_accum=2)
    if lora:  # dropout makes the RNG state part of what must be restored
        straight.lora = LoRAConfig(rank=4, alpha=8, dropout=0.1)
        first.lora = LoRAConfig(rank=4, alpha=8, dropout=0.1)
    finetune(straight)
    assert finetune(first, until=4).reason == "until"
    assert not (pocketlm_home / "models" / "resumed").exists()  # nothing exported before the end
    second = job(tiny, corpus, "resumed", tmp_path)
    second.resume = True  # the saved settings are used, not these
    assert finetune(second).step == 8
    a, b = (
        weights(pocketlm_home / "models" / "straight"),
        weights(pocketlm_home / "models" / "resumed"),
    )
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    metrics = (tmp_path / "run-resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == list(range(1, 9))


def test_sigkill_leaves_the_last_checkpoint_intact(tiny, corpus, tmp_path, pocketlm_home):
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "pocketlm.cli.main",
        "finetune",
        str(tiny),
        str(corpus),
        "--out",
        "killed",
        "--steps",
        "100000",
        "--save-every",
        "1",
        "--batch-size",
        "2",
        "--block-size",
        "16",
        "--eval-every",
        "0",
        "--run-dir",
        str(run_dir),
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "POCKETLM_HOME": str(pocketlm_home), "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while (
            checkpoint.latest(run_dir) is None or _step(run_dir) < 3
        ) and time.monotonic() < deadline:
            assert process.poll() is None, "the training process ended early"
            time.sleep(0.05)
        time.sleep(0.13)  # somewhere in the next step or checkpoint write
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    folder = checkpoint.latest(run_dir)
    state = checkpoint.load(folder)
    assert folder.name == f"step-{state['step']:06d}" and state["step"] >= 3
    assert state["model"].keys() >= {"transformer.wte.weight", "transformer.h.0.attn.c_attn.weight"}
    # And the run goes on from it.
    resumed = job(tiny, corpus, "killed", tmp_path, steps=100000)
    resumed.resume, resumed.run_dir = True, run_dir
    assert finetune(resumed, until=state["step"] + 1).step == state["step"] + 1


def _step(run_dir: Path) -> int:
    folder = checkpoint.latest(run_dir)
    return int(folder.name.split("-")[1]) if folder else 0


# -- LoRA --


def test_lora_trains_only_adapters_and_merges_exactly(tiny, corpus, tmp_path):
    loaded = loader.load(tiny)
    model = loaded.model
    before = {name: t.clone() for name, t in model.state_dict().items()}
    wrapped = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["c_attn", "c_fc"]))
    assert wrapped == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.1.attn.c_attn",
        "transformer.h.1.mlp.c_fc",
    ]
    data = load_dataset(corpus, loaded.tokenizer, block_size=16, context_length=64)
    config = TrainConfig(steps=4, batch_size=2, lr=1e-2, save_every=0, eval_every=0)
    Trainer(
        model, tokenizer=loaded.tokenizer, dataset=data, config=config, run_dir=tmp_path
    ).train()
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        assert torch.equal(tensor, before[name.replace(".base.", ".")]), f"{name} changed"
    assert all(m.lora_B.abs().sum() > 0 for m in lora_modules(model).values())

    model.eval()
    ids = data.train.inputs[:2]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        unmerged = model(ids, positions)
        merge_lora(model)
        merged = model(ids, positions)
    assert not lora_modules(model)
    assert set(model.state_dict()) == set(before)  # the original names again
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert not torch.allclose(merged, _logits(tiny, ids), atol=1e-3)  # the adapter did something


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = loader.load(folder).model
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids))


def test_adapter_only_output_runs_with_run_adapter(tiny, corpus, tmp_path, pocketlm_home, capsys):
    import pocketlm

    adapter = tmp_path / "my-adapter"
    lora_job = job(tiny, corpus, str(adapter), tmp_path, steps=30, lr=3e-2)
    lora_job.lora, lora_job.adapter_only = (
        LoRAConfig(rank=8, alpha=16, targets=["c_attn", "c_fc"]),
        True,
    )
    result = finetune(lora_job)
    assert result.output == adapter and (adapter / "adapter_model.safetensors").is_file()
    with_adapter = pocketlm.load(str(tiny), adapter=adapter)
    plain = pocketlm.load(str(tiny))
    ids = torch.tensor([with_adapter.tokenizer.encode("A journey of a")])
    with torch.no_grad():
        assert not torch.allclose(
            with_adapter.model(ids, torch.arange(ids.shape[1])[None]),
            plain.model(ids, torch.arange(ids.shape[1])[None]),
            atol=1e-3,
        )
    expected = with_adapter.generate("To be", max_tokens=8, temperature=0).text
    assert cli(["run", str(tiny), "To be", "-t", "0", "-n", "8", "--adapter", str(adapter)]) == 0
    assert capsys.readouterr().out == expected + "\n"


# -- several processes --


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_with_gloo_match_one_with_the_same_global_batch(
    tiny, corpus, tmp_path, monkeypatch, mode
):
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    torchrun = f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node 2"
    flags = "--steps 3 --batch-size 2 --grad-accum 2 --block-size 16 --lr 1e-2 --warmup 1"
    flags += " --eval-every 0 --save-every 0 --device cpu" + (" --fsdp" if mode == "fsdp" else "")
    command = f"{torchrun} -m pocketlm.cli.main finetune {tiny} {corpus} --out two {flags}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(command.split(), env=env, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-2000:]
    one = job(tiny, corpus, "one", tmp_path, steps=3, batch_size=4, grad_accum=2, warmup=1)
    one.run_dir, one.val_fraction = tmp_path / "home/runs/one", 0.1  # the CLI's defaults
    finetune(one)
    losses = {
        out: [
            json.loads(line)["loss"]
            for line in (tmp_path / f"home/runs/{out}/metrics.jsonl").open()
        ]
        for out in ("one", "two")
    }
    assert losses["one"] == pytest.approx(losses["two"], rel=1e-5) and len(losses["one"]) == 3
    a, b = weights(tmp_path / "home/models/two"), weights(tmp_path / "home/models/one")
    base = weights(tiny)
    for name in a:
        update = (b[name] - base[name]).abs().max()
        assert update > 1e-3, name  # every tensor moved (Adam moves each by about lr a step)
        # Adam divides by the gradient's own size, so rounding differences in tiny
        # gradients show up in the weights: compare with the size of the update.
        assert (a[name] - b[name]).abs().max() < 0.01 * update, name


# -- data --


def test_prompt_completion_jsonl_masks_the_prompt(tmp_path):
    from transformers import GPT2TokenizerFast

    from pocketlm.tokenizer import Tokenizer

    folder = make_gpt2(tmp_path / "gpt2")
    oracle = GPT2TokenizerFast.from_pretrained(folder)
    assert oracle("Hello world")["input_ids"] == [15496, 995]
    pairs = [("Q: capital of France?\nA:", " Paris"), ("Translate 'chat':", " cat, in English")]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    dataset = load_dataset(
        data, Tokenizer.from_dir(folder), block_size=64, context_length=128, val_fraction=0
    )
    inputs, labels = dataset.train.inputs[0].tolist(), dataset.train.labels[0].tolist()
    expected_ids, expected_labels = [], []
    for prompt, completion in pairs:
        p, c = oracle(prompt)["input_ids"], oracle(completion)["input_ids"]
        expected_ids += p + c + [50256]
        expected_labels += [IGNORE] * len(p) + c + [50256]
    n = len(expected_ids)
    assert inputs[:n] == expected_ids and labels[:n] == expected_labels
    assert labels[n:] == [IGNORE] * (64 - n)  # padding is not learned either


def test_text_folder_is_packed_into_blocks_with_a_validation_split(tiny, tmp_path):
    from pocketlm.tokenizer import Tokenizer

    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(SENTENCES[0] * 20)
    (folder / "sub" / "b.md").write_text(SENTENCES[1] * 20)
    (folder / ".hidden.txt").write_text("\x00")  # hidden files are not training data
    tokenizer = Tokenizer.from_dir(tiny)
    dataset = load_dataset(folder, tokenizer, block_size=16, context_length=64, val_fraction=0.25)
    stream = tokenizer.encode(SENTENCES[0] * 20) + [0] + tokenizer.encode(SENTENCES[1] * 20) + [0]
    n_blocks = -(-len(stream) // 16)
    assert len(dataset.train) + len(dataset.val) == n_blocks
    assert len(dataset.val) == round(n_blocks * 0.25)
    blocks = torch.cat([dataset.train.inputs, dataset.val.inputs]).tolist()
    padded = stream + [0] * (n_blocks * 16 - len(stream))
    assert sorted(blocks) == sorted(padded[i : i + 16] for i in range(0, len(padded), 16))


BAD_DATA = {
    "empty": (b"", "corpus.txt is empty"),
    "binary": (b"\x7fELF\x02\x01\x01\x00\x00\x00" * 10, "looks like a binary file"),
    "utf8": (b"fine line\nsecond \xff\xfe line\n", "corpus.txt:2: not valid UTF-8"),
}


@pytest.mark.parametrize("kind", list(BAD_DATA))
def test_bad_text_files_are_one_line_errors(kind, tiny, tmp_path, pocketlm_home, capsys):
    content, message = BAD_DATA[kind]
    data = tmp_path / "corpus.txt"
    data.write_bytes(content)
    assert cli(["finetune", str(tiny), str(data), "--out", "x", "--steps", "1"]) == 1
    _assert_one_line_error(capsys, message)


def test_jsonl_errors_name_the_file_and_line(tiny, tmp_path, pocketlm_home, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"text": "one"}\n\n{"prompt": "a", "completion": "b"}\n{"text": "unclosed\n')
    assert cli(["finetune", str(tiny), str(data), "--out", "x", "--steps", "1"]) == 1
    _assert_one_line_error(capsys, f"{data}:4: not valid JSON")
    data.write_text('{"text": "one"}\n{"prompt": "a"}\n')
    assert cli(["finetune", str(tiny), str(data), "--out", "x", "--steps", "1"]) == 1
    _assert_one_line_error(capsys, f'{data}:2: "prompt" and "completion" must both be strings')


def test_block_size_beyond_the_context_is_refused(tiny, corpus, pocketlm_home, capsys):
    assert cli(["finetune", str(tiny), str(corpus), "--out", "x", "--block-size", "65"]) == 1
    _assert_one_line_error(
        capsys, "--block-size 65 is larger than the model's context of 64 tokens"
    )


def test_an_existing_output_name_needs_overwrite(tiny, corpus, tmp_path, pocketlm_home, capsys):
    (pocketlm_home / "models" / "taken").mkdir(parents=True)
    args = [
        "finetune",
        str(tiny),
        str(corpus),
        "--out",
        "taken",
        "--steps",
        "1",
        "--block-size",
        "16",
        "--run-dir",
        str(tmp_path / "run"),
    ]
    assert cli(args) == 1
    _assert_one_line_error(capsys, "a model named 'taken' already exists")
    assert cli(args + ["--overwrite"]) == 0
    assert (pocketlm_home / "models" / "taken" / "model.safetensors").is_file()


def _assert_one_line_error(capsys, message: str) -> None:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


# -- stopping early, and options that must not change the result --


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(tiny, corpus, tmp_path, pocketlm_home):
    def press_ctrl_c(event: dict) -> None:
        if event["kind"] == "step" and event["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    interrupted = job(tiny, corpus, "stopped", tmp_path, steps=50)
    result = finetune(interrupted, on_event=press_ctrl_c)
    assert (result.reason, result.step, result.output) == ("interrupted", 2, None)
    assert checkpoint.load(checkpoint.latest(result.run_dir))["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler given back


def test_max_time_saves_and_stops(tiny, corpus, tmp_path, pocketlm_home):
    result = finetune(job(tiny, corpus, "timed", tmp_path, steps=50, max_time=1e-6))
    assert (result.reason, result.step) == ("time", 1)
    assert checkpoint.latest(result.run_dir).name == "step-000001"


def test_activation_checkpointing_gives_the_same_weights(tiny, corpus, tmp_path, pocketlm_home):
    finetune(job(tiny, corpus, "plain", tmp_path, steps=2))
    finetune(job(tiny, corpus, "recomputed", tmp_path, steps=2, activation_checkpointing=True))
    a, b = weights(pocketlm_home / "models/plain"), weights(pocketlm_home / "models/recomputed")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name


def test_a_fresh_run_does_not_discard_an_unfinished_one(
    tiny, corpus, tmp_path, pocketlm_home, capsys
):
    args = f"finetune {tiny} {corpus} --out again --steps 4 --block-size 16 --max-time 0.000001"
    assert cli(args.split()) == 0  # stopped by the time limit after one step, checkpoint kept
    capsys.readouterr()
    assert cli(args.split()) == 1
    _assert_one_line_error(capsys, "pass --resume to continue it, or --overwrite to start again")
    assert cli(f"finetune gpt2 {corpus} --out again --resume".split()) == 1
    _assert_one_line_error(capsys, f"the run 'again' fine-tunes {tiny}, not gpt2")
    assert cli(f"finetune {tiny} {corpus} --out again --resume".split()) == 0
    assert (pocketlm_home / "models/again/model.safetensors").is_file()


def test_resume_with_other_data_is_refused_before_run_json_changes(
    tiny, corpus, tmp_path, pocketlm_home
):
    first = job(tiny, corpus, "kept", tmp_path, steps=50, max_time=1e-6)
    assert finetune(first).reason == "time"  # one step, a checkpoint
    saved = (first.run_dir / "run.json").read_text()
    other = tmp_path / "other.txt"
    other.write_text("Something else entirely, and longer than one block of text.\n" * 20)
    again = job(tiny, other, "kept", tmp_path)
    again.resume = True
    with pytest.raises(PocketLMError, match="changed since the checkpoint"):
        finetune(again)
    assert (first.run_dir / "run.json").read_text() == saved


def test_bf16_autocast_trains_close_to_fp32(tiny, corpus, tmp_path, pocketlm_home):
    runs = {
        p: finetune(job(tiny, corpus, p, tmp_path, steps=3, precision=p)) for p in ("fp32", "bf16")
    }
    losses = {
        p: [json.loads(line)["loss"] for line in (r.run_dir / "metrics.jsonl").open()]
        for p, r in runs.items()
    }
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
    assert losses["bf16"] != losses["fp32"]  # bf16 matmuls did run
    assert all(t.dtype == torch.float32 for t in weights(pocketlm_home / "models/bf16").values())
