"""The LoRA adapters a server runs beside its base model, unmerged: `pocketlm serve MODEL
--lora NAME=PATH` (repeatable), and which of them a request asks for.

Each adapter is a folder from `pocketlm finetune --lora --adapter-only` (PEFT's layout). At
start each is read and checked against the base model's own layers (weights.adapter's
`fit_adapter`, on the model built on the `meta` device: an adapter made for another base is
refused in one line), then attached to the loaded model (generate.multilora), whose weights
stay as they are: one copy of the base for the bare model and every adapter, in one batch.

A request picks an adapter by its `model`, "MODEL:NAME" (an adapter is listed as a model
of its own, as vLLM lists them; the fleet, serve/fleet.py, resolves the name), or by a
`lora` field naming it (llama.cpp's and vLLM's per-request adapter); neither: the bare
model. Knows nothing of routes or the scheduler.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pocketlm.errors import PocketLMError
from pocketlm.generate.multilora import MultiLoRA
from pocketlm.serve.schemas import ApiError
from pocketlm.weights.adapter import fit_adapter, read_adapter, read_adapter_config
from pocketlm.weights.loader import empty_model


def parse_options(options: list[str]) -> dict[str, Path]:
    """`--lora NAME=PATH` options -> {name: folder}, each folder's config read (before the
    model loads, so a mistake is told at once)."""
    folders: dict[str, Path] = {}
    for text in options:
        name, sep, path = text.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise PocketLMError(f"--lora {text}: give NAME=PATH, e.g. --lora poet=./poet-adapter")
        if ":" in name:  # requests name it in "BASE:NAME", split at the last ':'
            raise PocketLMError(f"--lora {text}: an adapter's name cannot contain ':'")
        if name in folders:
            raise PocketLMError(f"--lora {text}: two adapters are named '{name}'")
        folders[name] = Path(path).expanduser()
        read_adapter_config(folders[name])
    return folders


def load_adapters(lm, folders: Mapping[str, str | Path]) -> MultiLoRA:  # noqa: ANN001 - LM
    """Read, check and attach each adapter folder to `lm`'s model, by name."""
    if not lm.native:
        raise PocketLMError(
            f"--lora needs a model pocketlm runs itself; {lm.name} runs through transformers: "
            "merge the adapter instead (pocketlm run --adapter)"
        )
    reference = empty_model(lm.config, source=lm.path)  # the checkpoint's layers, no memory
    adapters = MultiLoRA(lm.model)
    for name, folder in folders.items():
        try:
            adapter = read_adapter(folder)
            factors = fit_adapter(adapter, reference)
        except PocketLMError as error:
            raise PocketLMError(f"--lora {name}: {error}") from None
        adapters.add(name, factors, scale=adapter.config.scale, reference=reference)
    return adapters


def chosen(adapters: MultiLoRA | None, *, adapter: str | None, lora: str | None) -> str | None:
    """The adapter a request runs with: the one its `model` named ("MODEL:NAME", which the
    fleet resolved against this model's adapters: serve/fleet.py) or its `lora` field's;
    None: the bare model. A 404 for a `lora` this model lacks, a 400 when the two name
    different adapters."""
    if lora is None:
        return adapter
    if adapter is not None and lora != adapter:
        raise ApiError(
            f"the model names the adapter '{adapter}' and lora names '{lora}': give one",
            param="lora",
        )
    if adapters is None or lora not in adapters.names:
        have = ", ".join(sorted(adapters.names)) if adapters is not None else ""
        raise ApiError(
            f"the adapter '{lora}' is not loaded; this model has "
            + (f"these: {have}" if have else "none (serve it with --lora NAME=PATH)"),
            status=404,
            param="lora",
            code="model_not_found",
        )
    return lora
