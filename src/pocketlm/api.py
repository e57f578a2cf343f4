"""The Python API: `lm = pocketlm.load("gpt2")`, `lm.generate(...)`, `lm.stream(...)`.

Glue between the rooms: resolves a name to files (weights.sources), loads them ready for
inference (weights.loader), and gives the result the engine's generation (an `LM` is a
`generate.Engine`: `stream`, `generate`, `session`, `use_draft`, `compile`), the features
(score, perplexity, embed) and few-shot prompting. Knows nothing of the terminal or HTTP.
"""

from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from pocketlm import paths
from pocketlm.errors import PocketLMError
from pocketlm.features import hidden, scores
from pocketlm.generate.engine import Completion, Engine, Usage
from pocketlm.prompting.fewshot import FewShot
from pocketlm.weights import loader
from pocketlm.weights.sources import resolve

__all__ = ["LM", "Completion", "Usage", "load"]

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class LM(Engine):
    """A loaded model with its tokenizer: generation (see `generate.Engine`), few-shot
    prompting and the features."""

    def __init__(self, loaded: loader.LoadedModel, *, name: str, context: int | None = None):
        super().__init__(loaded.model, loaded.tokenizer, context=context, name=name)
        self.config = loaded.config
        self.path = loaded.path
        self.native = loaded.native

    def compile(self, *, store: Path | None = None) -> None:
        """Decode through torch.compile from now on (see `Engine.compile`), the compiled
        step kept in `store`: by default pocketlm's own (`~/.local/share/pocketlm/compiled`
        or under POCKETLM_HOME), so that the next load of this model pays little for it."""
        super().compile(store=paths.compiled_dir() if store is None else store)

    def few_shot(
        self, query: str, examples: object, *, template: str | None = None, **options: object
    ) -> str:
        """Answer `query` in the pattern of solved examples (a .jsonl/.yaml file or a list of
        (input, output) pairs), with a `Q: {input}\nA: {output}` template unless given one;
        generation stops at the next example. See `pocketlm.prompting.fewshot`."""
        return FewShot.build(examples, template=template).answer(self, query, **options)

    # -- features: what the model computes (pocketlm.features) --

    def _encode_text(self, text: str | Seq[int]) -> list[int]:
        if isinstance(text, str):
            if not text:
                raise PocketLMError("the text is empty: give some text")
            return self.tokenizer.encode(text)
        return list(text)

    def score(self, text: str | Seq[int], *, top_k: int = 0) -> list[scores.TokenScore]:
        """Each token's log-probability given the text before it (the first has none),
        with the `top_k` most likely alternatives at each position. A text longer than
        the LM's context window is scored in windows of it, half a window apart."""
        ids = self._encode_text(text)
        return scores.token_logprobs(self.model, ids, top_k=top_k, context=self.context_length)

    def perplexity(
        self,
        text: str | Seq[int],
        *,
        context: int | None = None,
        stride: int | None = None,
        progress: scores.Progress | None = None,
    ) -> scores.PerplexityResult:
        """Perplexity by the transformers guide's sliding window (context: the LM's
        context window, stride: half of it, by default)."""
        ids = self._encode_text(text)
        context = self.context_length if context is None else context
        return scores.perplexity(self.model, ids, context=context, stride=stride, progress=progress)

    def embed(
        self,
        texts: str | Seq[str],
        *,
        layer: int = -1,
        pool: str = "mean",
        normalize: bool = False,
        batch_size: int = 8,
    ) -> hidden.Embeddings:
        """Hidden states of `layer` (0 = embeddings, -1 = final) for each text: pooled
        ("mean", "last") or per token ("none")."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise PocketLMError("no texts to embed")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text:
                raise PocketLMError(f"text {i} is empty (or not a string): give some text to embed")
        ids = self.tokenizer.encode_batch(texts)
        return hidden.embed(
            self.model, ids, layer=layer, pool=pool, normalize=normalize, batch_size=batch_size
        )


def load(
    name: str | Path | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    offline: bool = False,
    adapter: str | Path | None = None,
    context: int | None = None,
    quantize: str | None = None,
) -> LM:
    """Load one model, ready for inference, by name (`gpt2`, `smollm2-135m`, `org/repo`),
    local path or GGUF file; None loads the embedded default. `dtype` (fp32, bf16, fp16):
    the weights converted to it; None: a GGUF file's own quantization kept as stored (on a
    CPU), anything else in fp32. `adapter`: a LoRA adapter
    folder to merge in. `context`: the context window in tokens (default: the model's, at
    most 4096). `quantize="int8"` or `"int4"`: weight-only quantized weights
    (pocketlm.kernels). Speculative decoding and compilation are steps of their own
    afterwards: `lm.use_draft(load(smaller))`, `lm.compile()`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise PocketLMError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16")
        dtype = DTYPES[dtype]
    path = resolve(None if name is None else str(name), offline=offline)
    loaded = loader.load(
        path, dtype=dtype, device=device, quantize=quantize, adapter=adapter, prepare=True
    )
    return LM(loaded, name=str(name) if name is not None else path.parent.name, context=context)
