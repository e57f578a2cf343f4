"""Per-request LoRA in `pocketlm serve` (serve/adapters.py, generate/multilora.py): adapters
served unmerged beside their base, the bare base and several adapters in one batch over one
copy of the weights, picked by `model: "BASE:NAME"` or a `lora` field.

Two adapters with random non-zero factors are saved as `finetune --adapter-only` saves them
(train/lora.save_adapter, PEFT's layout) for a tiny random Llama: "poet" on the attention
(q, k, v, o: `fuse()` joins q/k/v into one qkv_proj), "critic" on v and the MLP (a part of
qkv_proj, both parts of gate_up_proj, down_proj). The oracle for each is pocketlm's own
loader with `adapter=`, which merges it into the weights (checked in test_finetune); for the
bare base, the base loaded alone. One server for the module, driven by the openai client.
"""

import functools
import threading

import anthropic
import ollama
import openai
import pytest
import torch

import pocketlm
from checkpoints import make_llama
from pocketlm.cli.main import main as cli
from pocketlm.kernels.gguf import GGUFLinear
from pocketlm.kernels.int8 import Int8Linear
from pocketlm.serve.adapters import load_adapters
from pocketlm.serve.fleet import held_bytes
from pocketlm.serve.scheduler import Request
from pocketlm.train.gguf_export import export_gguf
from pocketlm.train.lora import LoRAConfig, apply_lora, lora_modules, save_adapter
from pocketlm.weights import loader
from test_serve_api import Server

MODEL = "tiny"
TARGETS = {"poet": [], "critic": ["v_proj", "gate_proj", "up_proj", "down_proj"]}  # []: defaults
PROMPT = "The dog ran after the ball in the garden while the children laughed and the old"


def make_adapter(base, folder, *, seed, targets):
    """A rank-4 adapter of `base` with random non-zero A and B, in PEFT's layout."""
    model = loader.load(base).model  # the checkpoint's own layers, as finetune trains them
    config = LoRAConfig(rank=4, alpha=8.0, targets=targets)
    apply_lora(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            for factor in (layer.lora_A, layer.lora_B):
                factor.copy_(0.2 * torch.randn(factor.shape, generator=generator))
    folder.mkdir()
    save_adapter(model, folder, config=config, base=str(base))
    return folder


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_llama(root / "base", seed=3)
    folders = {
        name: make_adapter(base, root / name, seed=i, targets=targets)
        for i, (name, targets) in enumerate(TARGETS.items())
    }
    return base, folders


@pytest.fixture(scope="module")
def merged(made):
    """Adapter name (None: the bare base) -> the model with it merged, loaded alone."""
    base, folders = made
    return {None: pocketlm.load(base)} | {
        name: pocketlm.load(base, adapter=folder) for name, folder in folders.items()
    }


@pytest.fixture(scope="module")
def server(made):
    base, folders = made
    server = Server(pocketlm.load(base), loras=folders, max_batch=4, timeout=60)
    yield server
    server.close()


def forward(model, ids, rows=3):
    """Logits (rows, T, V) of the same prompt in each row, with no cache."""
    tokens = torch.tensor([ids] * rows)  # (rows, T)
    with torch.inference_mode():
        return model(tokens, torch.arange(len(ids)).expand(rows, -1))


def test_one_forward_runs_each_row_with_its_adapter(server, merged):
    adapters, model = server.service.adapters, server.service.lm.model
    ids = merged[None].tokenizer.encode(PROMPT)
    alone = {name: forward(lm.model, ids, rows=1)[0] for name, lm in merged.items()}
    assert (alone["poet"] - alone[None]).abs().max() > 0.5  # the adapter matters
    # On this thread only: the server's scheduler thread keeps its own choice.
    for rows in ([None, "poet", "critic"], ["critic", None, "poet"]):
        adapters.select([adapters.index(name) for name in rows])
        logits = forward(model, ids)
        for row, name in enumerate(rows):
            assert (logits[row] - alone[name]).abs().max() < 1e-4, (rows, name)
    adapters.select([0, 0, 0])
    assert (forward(model, ids) - alone[None]).abs().max() == 0
    factors = [t for layer in adapters.layers.values() for f in layer.factors if f for t in f]
    extra = held_bytes(model) - held_bytes(merged[None].model)  # what a server's budget counts
    assert extra == sum(t.nbytes for t in factors) > 0
    # The choice is this thread's: another one running the model (the server's embeddings)
    # sees the bare model.
    adapters.select([1, 1, 1])
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(forward(model, ids)))
    thread.start()
    thread.join()
    assert (elsewhere[0] - alone[None]).abs().max() == 0


def test_two_adapters_and_the_base_in_one_batch_equal_their_merged_models(
    server, merged, monkeypatch
):
    scheduler, adapters = server.service.scheduler, server.service.adapters
    batches = []  # each forward's row adapters, seen by the real `select`
    select = adapters.select
    monkeypatch.setattr(
        adapters, "select", lambda rows: (batches.append(tuple(rows)), select(rows))
    )
    ids = merged[None].tokenizer.encode(PROMPT)
    names = [None, "poet", "critic", "poet"]
    prompts = [ids, ids, ids, ids[3:]]
    events = {i: [] for i in range(len(names))}
    done = threading.Semaphore(0)

    def emit(i):
        def take(event):
            events[i].append(event)
            if event.finish_reason is not None:
                done.release()

        return take

    params = merged[None].params(temperature=0, max_tokens=10, logprobs=0)
    scheduler.submit([
        Request(p, params, emit(i), adapter=name)
        for i, (name, p) in enumerate(zip(names, prompts, strict=True))
    ])  # fmt: skip
    for _ in names:
        assert done.acquire(timeout=60)
    assert (0, 1, 2, 1) in batches  # one decode step held all four rows
    texts = set()
    for i, (name, prompt) in enumerate(zip(names, prompts, strict=True)):
        tokens = [e.token for e in events[i] if e.token is not None]
        alone = merged[name].generate(prompt, max_tokens=10, temperature=0)
        assert tokens == alone.tokens, name
        with torch.inference_mode():
            full = torch.tensor([prompt + tokens[:-1]])
            logits = merged[name].model(full, torch.arange(full.shape[1])[None])[
                0, len(prompt) - 1 :
            ]
        expected = torch.log_softmax(logits.float(), -1)[range(len(tokens)), tokens]
        got = torch.tensor([e.logprob for e in events[i] if e.token is not None])
        assert (got - expected).abs().max() < 1e-4, name
        texts.add(tuple(tokens))
    assert len(texts) == 4  # the base and each adapter answer differently


def test_the_openai_client_picks_an_adapter_by_model_or_lora_field(server, merged):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL, "tiny:poet", "tiny:critic"]
    assert client.models.retrieve("tiny:critic").id == "tiny:critic"
    for name, options in (
        ("poet", dict(model="tiny:poet")),
        ("critic", dict(model=MODEL, extra_body={"lora": "critic"})),
        (None, dict(model=MODEL)),
    ):
        expected = merged[name].generate(PROMPT, max_tokens=8, temperature=0).text
        r = client.completions.create(prompt=PROMPT, max_tokens=8, temperature=0, **options)
        assert r.choices[0].text == expected and r.model == f"{MODEL}:{name}".removesuffix(":None")
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6)
    chat = client.chat.completions.create(**ask, temperature=0, extra_body={"lora": "poet"})
    assert chat.model == "tiny:poet" and chat.choices[0].message.content
    ask["model"] = "tiny:poet"
    chunks = list(client.chat.completions.create(**ask, temperature=0, stream=True))
    assert {c.model for c in chunks} == {"tiny:poet"}
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content


def test_ollama_and_anthropic_clients_pick_an_adapter_by_model(server, merged):
    expected = merged["poet"].generate(PROMPT, max_tokens=6, temperature=0).text
    olla = ollama.Client(host=server.url, timeout=60)
    options = {"temperature": 0, "num_predict": 6}
    r = olla.generate(model="tiny:poet", prompt=PROMPT, raw=True, options=options)
    assert (r.response, r.model) == (expected, "tiny:poet")
    messages = [{"role": "user", "content": "Hi"}]
    chat = server.client().chat.completions.create(
        model="tiny:poet", messages=messages, max_tokens=6, temperature=0
    )
    claude = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)
    m = claude.messages.create(
        model="tiny:poet", messages=messages, max_tokens=6, extra_body={"temperature": 0}
    )
    assert (m.content[0].text, m.model) == (chat.choices[0].message.content, "tiny:poet")
    with pytest.raises(anthropic.NotFoundError, match="has no adapter 'nope'"):
        claude.messages.create(model="tiny:nope", messages=messages, max_tokens=1)


def test_an_unknown_adapter_is_a_404_and_two_names_a_400(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError, match="the model 'tiny' has no adapter 'nope'"):
        client.completions.create(model="tiny:nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.NotFoundError, match="'nope' is not loaded.*critic, poet"):
        client.completions.create(
            model=MODEL, prompt="x", max_tokens=1, extra_body={"lora": "nope"}
        )
    with pytest.raises(openai.NotFoundError, match="the model 'other:poet' does not exist"):
        client.completions.create(model="other:poet", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="names the adapter 'poet' and lora"):
        client.chat.completions.create(
            model="tiny:poet",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"lora": "critic"},
        )

    # Past the routes (another caller of the scheduler): the request alone fails.
    events, done = [], threading.Event()
    params = server.service.lm.params(max_tokens=1)
    request = Request([1, 2], params, lambda e: (events.append(e), done.set()), adapter="nope")
    server.service.scheduler.submit([request])
    assert done.wait(30) and events[-1].finish_reason == "error"
    assert events[-1].text == "no LoRA adapter named 'nope' is loaded"


def test_the_prefix_cache_never_gives_one_adapter_the_kv_of_another(server, merged):
    client = server.client()
    hits = "pocketlm_prefix_cache_hits_total"
    # a prompt no other test sends: no adapter holds any of its blocks yet
    prompt = "Once upon a time in a small village by the sea there lived an old fisherman who"
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    before = server.metrics()[hits]
    expected = merged["poet"].generate(prompt, max_tokens=4, temperature=0).text
    first = client.completions.create(model="tiny:poet", prompt=prompt, max_tokens=4, temperature=0)
    assert server.metrics()[hits] == before  # the base's KV of this prompt was not reused
    again = client.completions.create(model="tiny:poet", prompt=prompt, max_tokens=4, temperature=0)
    assert server.metrics()[hits] == before + 1  # ... the poet's own was
    assert first.choices[0].text == again.choices[0].text == expected != base.choices[0].text


@pytest.mark.parametrize("kind", ["int8", "q8_0 GGUF as stored"])
def test_a_quantized_base_serves_adapters_within_its_own_rounding(made, merged, kind, tmp_path):
    base, folders = made
    if kind == "int8":
        load, layer = functools.partial(pocketlm.load, base, quantize="int8"), Int8Linear
    else:
        gguf = export_gguf(str(base), tmp_path / "tiny-q8_0.gguf", qtype="q8_0")
        load, layer = functools.partial(pocketlm.load, gguf), GGUFLinear
    lm = load()
    adapters = load_adapters(lm, folders)
    assert isinstance(adapters.layers["model.layers.0.self_attn.qkv_proj"].base, layer)
    ids = merged[None].tokenizer.encode(PROMPT)
    names = [None, "poet", "critic"]
    exact = {name: forward(merged[name].model, ids, rows=1)[0] for name in names}
    # How far this quantization puts a model from fp32: the base, each adapter merged first.
    rounding = max(
        (forward(load(adapter=folders.get(name)).model, ids, rows=1)[0] - exact[name]).abs().max()
        for name in names
    )
    adapters.select([adapters.index(name) for name in names])
    logits = forward(lm.model, ids)
    for row, name in enumerate(names):
        assert 0 < (logits[row] - exact[name]).abs().max() <= 1.5 * rounding, name


def test_an_adapter_of_another_base_is_refused_at_start_in_one_line(made, tmp_path, capsys):
    base, folders = made
    other = make_llama(tmp_path / "other", seed=4, hidden_size=32)
    wrong = make_adapter(other, tmp_path / "wrong", seed=5, targets=[])
    args = ["serve", str(base), "--port", "0", "--lora", f"poet={folders['poet']}"]
    capsys.readouterr()  # what making the checkpoint printed
    assert cli([*args, "--lora", f"wrong={wrong}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --lora wrong: ") and "trained for another model?" in err
    assert err.count("\n") == 1
    assert cli([*args, "--lora", "poet"]) == 1
    assert (
        capsys.readouterr().err
        == "error: --lora poet: give NAME=PATH, e.g. --lora poet=./poet-adapter\n"
    )
