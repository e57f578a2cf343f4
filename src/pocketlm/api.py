"""The Python API: `lm = pocketlm.load("gpt2")`, `lm.generate(...)`, `lm.stream(...)`.

Glue between the rooms: resolves a name to files (weights.sources), loads them
(weights.loader), and drives generation (generate) with sampling parameters checked up
front. Knows nothing of the terminal or HTTP.
"""

import logging
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pocketlm import features
from pocketlm.errors import PocketLMError
from pocketlm.generate import CONTEXT, LOOKAHEAD
from pocketlm.generate.sequence import Sequence
from pocketlm.generate.stream import Chunk, Stats, generate_tokens, stream_text
from pocketlm.sampling import SamplingParams
from pocketlm.weights import loader

log = logging.getLogger("pocketlm")

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion:
    text: str
    finish_reason: str
    usage: Usage
    stats: Stats
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    # With logprobs=k: the k most likely (id, logprob) at each generated token.
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


class LM:
    """A loaded model with its tokenizer, ready to generate."""

    def __init__(
        self,
        loaded: loader.LoadedModel,
        *,
        name: str,
        context: int | None = None,
        compile: bool = False,
    ) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.path = loaded.path
        self.native = loaded.native
        self.name = name
        self.last_stats = Stats()
        self._sequence: Sequence | None = None
        self.draft: LM | None = None  # speculative decoding's draft model (`set_draft`)
        self.lookahead = LOOKAHEAD  # tokens the draft proposes a round
        self.compile = compile  # decode steps through torch.compile (pocketlm.generate.compiled)
        # The KV cache is preallocated for the whole window: a 128k-token window would
        # take GBs, so by default it is capped (as llama.cpp's and Ollama's num_ctx are).
        if context is not None and context < 2:
            raise PocketLMError(f"context must be at least 2 tokens (got {context})")
        self.context_length = min(context or CONTEXT, self.model.config.context_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def apply_adapter(self, path: str | Path) -> None:
        """Merge a LoRA adapter (from `pocketlm finetune --lora --adapter-only`) into the weights."""
        from pocketlm.train.lora import load_adapter

        if getattr(self.model, "prepared", False):
            # Fused and re-laid-out layers no longer carry the checkpoint's names.
            raise PocketLMError(
                "an adapter is merged while loading: pocketlm.load(..., adapter=PATH)"
            )

        load_adapter(self.model, Path(path), merge=True)
        self._sequence = None  # its cache was computed with the old weights

    def set_draft(self, draft: "LM | None", *, lookahead: int = LOOKAHEAD) -> None:
        """Generate with speculative decoding, `draft` proposing `lookahead` tokens a round
        (None: stop). The draft must share this model's tokenizer; the output
        distribution is this model's."""
        from pocketlm.generate.speculative import check_draft, check_lookahead

        check_lookahead(lookahead)
        if draft is not None:
            check_draft(self.tokenizer, draft.tokenizer, names=(self.name, draft.name))
        self.draft, self.lookahead = draft, lookahead

    def _speculative(self, seq: Sequence, ids: list[int], **options: object) -> Iterator:
        from pocketlm.generate.speculative import speculative_tokens

        return speculative_tokens(
            seq, self.draft.sequence(), ids, lookahead=self.lookahead, **options
        )

    def sequence(self) -> Sequence:
        """The LM's own sequence (KV cache), reused between calls so a prompt that extends
        the previous one (a chat) only computes its new tokens."""
        if self._sequence is None:
            self._sequence = Sequence(
                self.model, max_seq_len=self.context_length, compile=self.compile
            )
        return self._sequence

    def encode_prompt(
        self, prompt: str | Seq[int], *, max_tokens: int, truncate: bool = True
    ) -> list[int]:
        """Prompt ids, left-truncated (with a warning) to leave room in the window for at
        least one new token, or refused when `truncate` is False."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise PocketLMError("the prompt is empty: give some text to continue")
        room = self.context_length - 1
        if len(ids) > room:
            if not truncate:
                raise PocketLMError(
                    f"the prompt is {len(ids)} tokens but the context window is {self.context_length}; "
                    "shorten it or allow truncation"
                )
            log.warning(
                "prompt is %d tokens; keeping the last %d (the context window is %d)",
                len(ids),
                room,
                self.context_length,
            )
            ids = ids[-room:]
        return ids

    def stream(
        self,
        prompt: str | Seq[int],
        *,
        max_tokens: int = 128,
        stop: str | Seq[str] = (),
        truncate: bool = True,
        top_logprobs: int = 0,
        **sampling: object,
    ) -> Iterator[Chunk]:
        """Yield text pieces as they are generated; the last carries the finish reason.

        Sampling options (temperature, top_k, top_p, min_p, repetition_penalty,
        presence_penalty, frequency_penalty, logit_bias, seed) are those of
        `SamplingParams`."""
        params = make_sampling_params(sampling, vocab_size=self.model.config.vocab_size)
        if max_tokens <= 0:
            raise PocketLMError(f"max_tokens must be at least 1 (got {max_tokens})")
        stops = [stop] if isinstance(stop, str) else list(stop)
        if any(not s for s in stops):
            raise PocketLMError("stop sequences must not be empty strings")
        ids = self.encode_prompt(prompt, max_tokens=max_tokens, truncate=truncate)
        self.last_stats = Stats()
        steps = (self._speculative if self.draft is not None else generate_tokens)(
            self.sequence(),
            ids,
            params=params,
            max_tokens=max_tokens,
            eos_ids=self.tokenizer.eos_ids,
            top_logprobs=top_logprobs,
            stats=self.last_stats,
        )
        yield from stream_text(steps, self.tokenizer, stop=stops)

    def generate(
        self, prompt: str | Seq[int], *, logprobs: int = 0, **options: object
    ) -> Completion:
        """Generate a whole completion: text, finish reason, usage and timing; with
        `logprobs=k`, the k most likely alternatives at each token too."""
        if logprobs:
            if not 0 <= logprobs <= self.model.config.vocab_size:
                raise PocketLMError(
                    f"logprobs must be between 0 and the vocabulary size (got {logprobs})"
                )
            options = {**options, "top_logprobs": logprobs}
        pieces, tokens, token_logprobs, top = [], [], [], []
        finish = "length"
        for chunk in self.stream(prompt, **options):
            pieces.append(chunk.text)
            if chunk.token is not None:
                tokens.append(chunk.token)
                token_logprobs.append(chunk.logprob)
                top.append(chunk.top_logprobs)
            finish = chunk.finish_reason or finish
        stats = self.last_stats
        usage = Usage(stats.prompt_tokens, stats.new_tokens)
        return Completion(
            "".join(pieces), finish, usage, stats, tokens, token_logprobs, top if logprobs else []
        )

    def few_shot(
        self, query: str, examples: object, *, template: str | None = None, **options: object
    ) -> str:
        """Answer `query` in the pattern of solved examples (a .jsonl/.yaml file or a list of
        (input, output) pairs), with a `Q: {input}\nA: {output}` template unless given one;
        generation stops at the next example. See `pocketlm.prompting.fewshot`."""
        from pocketlm.prompting.fewshot import FewShot

        return FewShot.build(examples, template=template).answer(self, query, **options)

    # -- features: what the model computes (pocketlm.features) --

    def _encode_text(self, text: str | Seq[int]) -> list[int]:
        if isinstance(text, str):
            if not text:
                raise PocketLMError("the text is empty: give some text")
            return self.tokenizer.encode(text)
        return list(text)

    def score(self, text: str | Seq[int], *, top_k: int = 0) -> list[features.TokenScore]:
        """Each token's log-probability given the text before it (the first has none),
        with the `top_k` most likely alternatives at each position. A text longer than
        the LM's context window is scored in windows of it, half a window apart."""
        ids = self._encode_text(text)
        return features.token_logprobs(self.model, ids, top_k=top_k, context=self.context_length)

    def perplexity(
        self,
        text: str | Seq[int],
        *,
        context: int | None = None,
        stride: int | None = None,
        progress: features.Progress | None = None,
    ) -> features.PerplexityResult:
        """Perplexity by the transformers guide's sliding window (context: the LM's
        context window, stride: half of it, by default)."""
        ids = self._encode_text(text)
        context = self.context_length if context is None else context
        return features.perplexity(
            self.model, ids, context=context, stride=stride, progress=progress
        )

    def embed(
        self,
        texts: str | Seq[str],
        *,
        layer: int = -1,
        pool: str = "mean",
        normalize: bool = False,
        batch_size: int = 8,
    ) -> features.Embeddings:
        """Hidden states of `layer` (0 = embeddings, -1 = final) for each text: pooled
        ("mean", "last") or per token ("none")."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise PocketLMError("no texts to embed")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text:
                raise PocketLMError(f"text {i} is empty (or not a string): give some text to embed")
        ids = self.tokenizer.encode_batch(texts)
        return features.embed(
            self.model, ids, layer=layer, pool=pool, normalize=normalize, batch_size=batch_size
        )


def make_sampling_params(options: dict[str, object], *, vocab_size: int) -> SamplingParams:
    """SamplingParams from keyword options, with one-line errors for unknown or bad ones."""
    known = SamplingParams.__dataclass_fields__
    if unknown := sorted(set(options) - set(known)):
        raise PocketLMError(f"unknown option {unknown[0]!r}; options are: {', '.join(known)}")
    if options.get("temperature") is None:
        options = {**options, "temperature": SamplingParams.temperature}
    params = SamplingParams(**{k: v for k, v in options.items() if v is not None})
    params.validate(vocab_size=vocab_size)
    return params


def load(
    name: str | Path | None = None,
    *,
    dtype: str | torch.dtype = "fp32",
    device: str | None = None,
    offline: bool = False,
    adapter: str | Path | None = None,
    context: int | None = None,
    quantize: str | None = None,
    draft: str | Path | None = None,
    draft_quantize: str | None = None,
    lookahead: int = LOOKAHEAD,
    compile: bool = False,
) -> LM:
    """Load a model by name (`gpt2`, `smollm2-135m`, `org/repo`), local path or GGUF file;
    None loads the embedded default. `adapter`: a LoRA adapter folder to merge in.
    `context`: the context window in tokens (default: the model's, at most 4096).
    `quantize="int8"` or `"int4"`: weight-only quantized weights (pocketlm.kernels);
    `draft`: a smaller model of the same tokenizer for speculative decoding, proposing
    `lookahead` tokens a round (pocketlm.generate.speculative), quantized as `draft_quantize`
    (default: as this model) -- a quantized copy of the model itself is a draft too;
    `compile=True`: decode steps through torch.compile (pocketlm.generate.compiled)."""
    from pocketlm.generate.speculative import check_lookahead
    from pocketlm.weights.sources import resolve

    check_lookahead(lookahead)
    if draft_quantize is not None and draft is None:
        raise PocketLMError(
            "a draft quantization needs a draft model: name one (--draft MODEL, or draft=)"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise PocketLMError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16")
        dtype = DTYPES[dtype]
    path = resolve(None if name is None else str(name), offline=offline)
    loaded = loader.load(
        path, dtype=dtype, device=device, quantize=quantize, adapter=adapter, prepare=True
    )
    lm = LM(
        loaded,
        name=str(name) if name is not None else path.parent.name,
        context=context,
        compile=compile,
    )
    if draft is not None:
        options = dict(
            dtype=dtype,
            device=device,
            offline=offline,
            context=context,
            quantize=draft_quantize or quantize,
        )
        lm.set_draft(load(draft, **options), lookahead=lookahead)
    if compile:
        lm.sequence()  # compiles its decode step now, while loading
    return lm
