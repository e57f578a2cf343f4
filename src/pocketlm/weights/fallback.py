"""Architectures pocketlm has no native module for (Falcon, Phi, ...), run through
`transformers`' AutoModelForCausalLM behind the same `forward(tokens, positions, cache)`.

Slower than a native module (and `pocketlm show` says so), but the API, CLI and server
work unchanged. Without `transformers` installed, a clear error names the architecture.
Knows nothing of tokenizers, adapters or how the loader chooses this path.
"""

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pocketlm.errors import PocketLMError


class FallbackCache:
    """Stands in for a one-row KVCache: holds transformers' own cache and how many
    positions it has. It offers the few KVCache methods the server's scheduler uses on a
    batch of one (row 0, its size, trimming), so such a model is served one request at a
    time through the same loop."""

    def __init__(self, max_seq_len: int, device: torch.device) -> None:
        self.max_seq_len = max_seq_len
        self.past: Any = None
        self.device = device

    def crop(self, length: int) -> None:
        if self.past is None or (held := self.past.get_seq_length()) <= length:
            return
        try:
            self.past.crop(length)  # transformers 4: keep the first `length` positions
        except ValueError:
            self.past.crop(length - held)  # transformers 5: drop that many from the end

    @property
    def rows(self) -> int:
        return 0 if self.past is None else 1

    @property
    def slots(self) -> int:
        return 0 if self.past is None else self.past.get_seq_length()

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held now (transformers 5's per-layer cache objects)."""
        layers = getattr(self.past, "layers", None) or []
        tensors = [getattr(layer, name, None) for layer in layers for name in ("keys", "values")]
        return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))

    def row(self, row: int) -> "FallbackCache":
        if row != 0:
            raise ValueError("a model running through transformers has one cache row")
        return self

    def trim(self, rows: int, slots: int) -> None:
        """As KVCache.trim: keep the first `slots` positions, or nothing when rows is 0."""
        if rows == 0 or slots == 0:
            self.past = None
        else:
            self.crop(slots)


class FallbackConfig:
    """The few config values the engine reads, taken from a transformers config."""

    def __init__(self, hf_config: Any) -> None:
        self.vocab_size = hf_config.vocab_size
        self.context_length = getattr(hf_config, "max_position_embeddings", None) or getattr(
            hf_config, "n_positions", 2048
        )
        self.tie_word_embeddings = getattr(hf_config, "tie_word_embeddings", False)


class TransformersModel(nn.Module):
    """A transformers causal LM adapted to pocketlm's forward contract (batch 1 cache)."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model
        self.config = FallbackConfig(hf_model.config)
        # transformers 5 renamed forward's `past_key_values` to `cache`.
        params = inspect.signature(hf_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def make_cache(self, *, batch_size: int, max_seq_len: int) -> FallbackCache:
        if batch_size != 1:
            raise PocketLMError("models running through transformers serve one sequence at a time")
        return FallbackCache(max_seq_len, next(self.parameters()).device)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: FallbackCache | None = None,
        *,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        if cache is None:
            out = self.hf(
                input_ids=tokens,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=logits_to_keep,
            )
            return out.logits
        from transformers import DynamicCache  # optional and slow to import, as below

        cache.crop(int(positions[0, 0]))  # a rebuilt or rewound sequence drops later slots
        if cache.past is None:
            cache.past = DynamicCache()
        out = self.hf(
            input_ids=tokens,
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: cache.past},
            logits_to_keep=logits_to_keep,
        )
        cache.past = out.past_key_values
        return out.logits

    def layer_outputs(self, tokens: torch.Tensor, positions: torch.Tensor, cache: None = None):
        out = self.hf(
            input_ids=tokens, position_ids=positions, output_hidden_states=True, use_cache=False
        )
        yield from out.hidden_states


def transformers_model(
    path: Path, config: dict[str, Any], *, dtype: torch.dtype, device: torch.device | str
) -> TransformersModel:
    """The checkpoint at `path` through transformers' AutoModelForCausalLM, frozen and in
    eval mode (the loader adds the tokenizer, an adapter and `prepare`, as for any model)."""
    try:  # optional: only these architectures need it, and it is slow to import
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise PocketLMError(
            f"pocketlm has no native module for architecture {config['model_type']!r}; "
            "install transformers (pip install transformers) to run it through that"
        ) from None
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (ValueError, KeyError, OSError) as error:
        raise PocketLMError(
            f"transformers cannot load architecture {config['model_type']!r} from {path} "
            f"({' '.join(str(error).split())})"  # one line: transformers' messages have several
        ) from None
    return TransformersModel(hf_model.to(device).eval()).requires_grad_(False)
