"""Every native family through what the engine does beyond a forward pass, each on a tiny
random checkpoint made by `transformers`' own classes: hidden states of every layer equal
transformers' `output_hidden_states`; speculative decoding with a 1-layer draft of the same
family gives the target's own greedy tokens; a batch of requests in the server's scheduler
gives each what it gets alone; LoRA trains (the loss falls), merges, and the exported
folder loads in transformers with the same logits. The families' own test files check
logits, caches and GGUF conversion in depth; this one keeps every family on every path.

Each family is one row of FAMILIES: transformers' config and model class names, and the
switches that make the family what it is, at sizes a short prompt reaches."""

import threading

import pytest
import torch

from checkpoints import gpt2_vocab_files, hf_model
from pocketlm.features.hidden import embed
from pocketlm.generate.params import GenerationParams
from pocketlm.generate.sequence import Sequence
from pocketlm.generate.speculative import Stats, speculative_tokens
from pocketlm.generate.stream import generate_tokens
from pocketlm.sampling import SamplingParams
from pocketlm.serve.scheduler import Request, Scheduler
from pocketlm.train.export import write_model_folder
from pocketlm.train.lora import LoRAConfig, apply_lora, merge_lora
from pocketlm.weights import loader

LLAMA_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
# family -> (transformers config class, model class, config overrides)
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA_SHAPE, attention_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(LLAMA_SHAPE, sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(LLAMA_SHAPE, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(LLAMA_SHAPE, head_dim=24)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(LLAMA_SHAPE, head_dim=24)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(LLAMA_SHAPE, sliding_window=8, attn_logit_softcapping=5.0,
                    final_logit_softcapping=5.0, query_pre_attn_scalar=20)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(LLAMA_SHAPE, num_hidden_layers=3, sliding_window=8,
                         layer_types=["sliding_attention", "sliding_attention",
                                      "full_attention"])),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(LLAMA_SHAPE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(LLAMA_SHAPE, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=48, shared_expert_intermediate_size=64)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(LLAMA_SHAPE, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=48, norm_topk_prob=True)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(LLAMA_SHAPE, hidden_size=96, sliding_window=16, pad_token_id=0,
                  original_max_position_embeddings=32,  # LongRoPE switches at 32 tokens
                  rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                       partial_rotary_factor=0.75,  # 18 of 24 rotated
                                       short_factor=[1.0 + 0.05 * i for i in range(9)],
                                       long_factor=[1.0 + 0.7 * i for i in range(9)]))),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM",  # layer 1 NoPE (a draft: none)
                dict(LLAMA_SHAPE, no_rope_layer_interval=2, pad_token_id=None)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(LLAMA_SHAPE)),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(LLAMA_SHAPE, embedding_multiplier=4.0, attention_multiplier=0.1,
                     residual_multiplier=0.5, logits_scaling=2.0)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM",
                 dict(LLAMA_SHAPE, partial_rotary_factor=0.5, use_qkv_bias=True,
                      qk_layernorm=True, use_parallel_residual=True)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM",
                   dict(LLAMA_SHAPE, sliding_window=8)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.25)),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                    new_decoder_architecture=True, max_position_embeddings=128)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(LLAMA_SHAPE, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}  # fmt: skip
VOCAB = 50257  # GPT-2's vocabulary (shipped with pocketlm) serves every family here
PROMPTS = [[464, 3290, 373, 1043], [15496, 995, 11], [40, 588, 257, 1310, 286, 262, 3290, 318]]
GREEDY = SamplingParams(temperature=0.0)


def make(folder, family: str, *, seed: int = 0, **overrides):
    """A random checkpoint of `family` saved by transformers, every norm weight random
    too (transformers starts them at 1, where a left-out norm would not show)."""
    import transformers

    config_name, model_name, config = FAMILIES[family]
    ids = dict(vocab_size=VOCAB, bos_token_id=50256, eos_token_id=50256)
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    config = {**ids, **config, **overrides}
    if "layer_types" in config:  # one per layer, also in a shallower draft
        config["layer_types"] = config["layer_types"][: config["num_hidden_layers"]]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.split(".")[-2].startswith("ln"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    gpt2_vocab_files(folder)
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family, its folder, pocketlm's load of it, transformers' load of it)."""
    folder = make(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, folder, loader.load(folder), hf_model(folder)


def greedy_ids(model, prompt, n) -> list[int]:
    params = GenerationParams(GREEDY, max_tokens=n)
    return [s.token for s in generate_tokens(Sequence(model), prompt, params)]


def test_hidden_states_of_every_layer_equal_transformers(family):
    _, _, lm, hf = family
    ids = PROMPTS[2] * 3
    with torch.no_grad():
        expected = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert len(expected) == lm.model.config.num_layers + 1
    for layer in range(len(expected)):
        got = embed(lm.model, [ids], layer=layer, pool="none").vectors[0]
        torch.testing.assert_close(got, expected[layer][0], atol=1e-4, rtol=1e-4)


def test_speculative_decoding_gives_the_targets_tokens(family, tmp_path):
    name, _, lm, _ = family
    layers = "n_layer" if name == "gpt2" else "num_hidden_layers"
    draft = loader.load(make(tmp_path / "draft", name, seed=1, **{layers: 1})).model
    stats = Stats()
    params = GenerationParams(GREEDY, max_tokens=24)
    steps = speculative_tokens(Sequence(lm.model), Sequence(draft), PROMPTS[0], params,
                               stats=stats, lookahead=3)  # fmt: skip
    assert [s.token for s in steps] == greedy_ids(lm.model, PROMPTS[0], 24)
    assert stats.draft_proposed > 0


def test_a_batch_in_the_scheduler_gives_each_request_its_tokens_alone(family):
    _, _, lm, _ = family
    alone = [greedy_ids(lm.model, ids, 10) for ids in PROMPTS]
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=4, max_queue=8)
    scheduler.start()
    try:
        done = [[] for _ in PROMPTS]
        finished = [threading.Event() for _ in PROMPTS]

        def emitter(i):
            def emit(event):
                if event.token is not None:
                    done[i].append(event.token)
                if event.finish_reason is not None:
                    finished[i].set()

            return emit

        params = GenerationParams(GREEDY, max_tokens=10)
        scheduler.submit([Request(prompt_ids=list(ids), params=params, emit=emitter(i))
                          for i, ids in enumerate(PROMPTS)])  # fmt: skip
        assert all(f.wait(60) for f in finished)
    finally:
        scheduler.stop()
    assert done == alone


def test_lora_trains_merges_and_exports_to_transformers(family, tmp_path):
    name, folder, _, _ = family
    lm = loader.load(folder)  # its own copy: training changes the weights
    model = lm.model
    wrapped = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert wrapped  # the family's default targets exist
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.tensor([PROMPTS[2] * 4])
    positions = torch.arange(ids.shape[1])[None]
    losses = []
    model.train()
    for _ in range(5):
        logits = model(ids[:, :-1], positions[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    merge_lora(model)
    out = tmp_path / "exported"
    out.mkdir()
    write_model_folder(out, model, config=lm.config, tokenizer=lm.tokenizer, source=folder)
    with torch.no_grad():
        expected = model(ids, positions)
        got = hf_model(out)(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_every_native_architecture_is_here_and_on_the_cards():
    """A family added to models.ARCHITECTURES gets a row above, and `pocketlm show`
    (weights.card, which names them without importing torch) calls it native."""
    from pocketlm.models import ARCHITECTURES
    from pocketlm.weights.card import NATIVE_ARCHITECTURES

    assert set(ARCHITECTURES) == NATIVE_ARCHITECTURES
    assert set(ARCHITECTURES) == set(FAMILIES)
