"""Training data: text files, folders of them, or JSONL -> packed blocks of token ids.

DATA is one of
  - a text file: one document;
  - a folder: every `.txt` / `.md` / `.jsonl` file under it (sorted, hidden files skipped);
  - a `.jsonl` file: one JSON object a line, either {"text": ...} or
    {"prompt": ..., "completion": ...}; for the latter the loss is taken on the completion
    only (the prompt's labels are -100, as `transformers` and PyTorch's cross-entropy
    `ignore_index` expect);
  - a `.json` file: one array of such objects (as `datasets` and many exports write them).

Documents are tokenized, each followed by the end-of-text token, concatenated and cut into
blocks of `block_size` tokens (the last block padded with end-of-text tokens whose labels
are -100), as `run_clm.py`'s `group_texts` does. Labels line up with the inputs; the
trainer shifts them. A seeded shuffle of the blocks holds out a validation split.

Bad data becomes one-line `PocketLMError`s that name the file (and line, for JSONL).
Knows nothing of models or optimizers.
"""

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from pocketlm.errors import PocketLMError
from pocketlm.tokenizer import Tokenizer

IGNORE = -100  # label of a token the loss skips (prompt tokens, padding)
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl",)
JSON_SUFFIXES = (".json",)
_BINARY_SNIFF = 8192


@dataclass
class Document:
    """One training example before tokenization: text with the loss on all of it, or a
    prompt (no loss) followed by a completion (loss)."""

    text: str
    prompt: str = ""


@dataclass
class Blocks:
    """Packed training data: inputs and labels (N, block_size), int64."""

    inputs: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def subset(self, index: list[int]) -> "Blocks":
        return Blocks(self.inputs[index], self.labels[index])

    def fingerprint(self) -> str:
        """A digest of the data, so a resumed run can tell that it trains on the same."""
        digest = hashlib.sha256(self.inputs.numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()[:16]


@dataclass
class Dataset:
    train: Blocks
    val: Blocks | None
    tokens: int  # real (non-padding) tokens in the corpus


def read_documents(path: Path) -> list[Document]:
    """The documents in DATA (a text file, a folder or a JSONL file)."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES + JSON_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise PocketLMError(f"{path} holds no .txt, .md, .jsonl or .json files to train on")
        docs = [doc for file in files for doc in _read_file(file)]
    elif path.is_file():
        docs = _read_file(path)
    else:
        raise PocketLMError(f"training data {path} does not exist")
    if not any(d.text.strip() for d in docs):
        raise PocketLMError(f"{path} has no text to train on (it is empty)")
    return docs


def _read_file(file: Path) -> list[Document]:
    raw = file.read_bytes()
    if not raw.strip():
        raise PocketLMError(f"{file} is empty: give it some text to train on")
    if b"\x00" in raw[:_BINARY_SNIFF]:
        raise PocketLMError(f"{file} looks like a binary file, not text (it has NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise PocketLMError(
            f"{file}:{line}: not valid UTF-8 (byte {error.start}); save the file as UTF-8"
        ) from None
    text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the text
    if file.suffix.lower() in JSONL_SUFFIXES:
        return _parse_jsonl(text, file)
    if file.suffix.lower() in JSON_SUFFIXES:
        return _parse_json_array(text, file)
    return [Document(text)]


def _parse_json_array(text: str, file: Path) -> list[Document]:
    """A .json file is an array of records, never text to train on character by character."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise PocketLMError(
            f"{file}:{error.lineno}: not valid JSON ({error.msg}); a .json file must hold one "
            'array of {"text": ...} objects (or use .jsonl, one object a line)'
        ) from None
    if not isinstance(records, list):
        raise PocketLMError(
            f'{file}: expected an array of {{"text": ...}} objects, got a JSON '
            f"{'object' if isinstance(records, dict) else 'value'}; "
            "a plain text file should end in .txt"
        )
    if not records:
        raise PocketLMError(f"{file} is an empty array: no records to train on")
    return [_document(record, where=f"{file}: record {i}") for i, record in enumerate(records)]


def _parse_jsonl(text: str, file: Path) -> list[Document]:
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PocketLMError(f"{file}:{number}: not valid JSON ({error.msg})") from None
        docs.append(_document(record, where=f"{file}:{number}"))
    if not docs:
        raise PocketLMError(f"{file} has no JSON lines to train on")
    return docs


def _document(record: object, *, where: str) -> Document:
    if not isinstance(record, dict):
        raise PocketLMError(
            f'{where}: expected an object like {{"text": ...}}, got {type(record).__name__}'
        )
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise PocketLMError(f'{where}: "prompt" and "completion" must both be strings')
        if not completion:
            raise PocketLMError(f'{where}: "completion" is empty: there is nothing to learn')
        return Document(completion, prompt=prompt)
    text = record.get("text")
    if not isinstance(text, str):
        raise PocketLMError(f'{where}: expected a "text" string or "prompt" + "completion" strings')
    return Document(text)


def tokenize(docs: list[Document], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """One stream of ids and its labels: each document then end-of-text, prompts masked."""
    eos = end_of_text(tokenizer)
    # Prompt and completion are encoded apart, as at inference time the prompt is encoded
    # alone and the model continues it; so the mask boundary is exact.
    bos = tokenizer.encode("")  # [BOS] for models that want one, else []
    prompted = [i for i, d in enumerate(docs) if d.prompt]
    prompts = dict(
        zip(prompted, tokenizer.encode_batch([docs[i].prompt for i in prompted]), strict=True)
    )
    bodies = tokenizer.encode_batch([d.text for d in docs], add_bos=False)
    ids: list[int] = []
    labels: list[int] = []
    for i, body_ids in enumerate(bodies):
        prompt_ids = prompts.get(i, [])
        lead = [] if prompt_ids else bos  # the prompt carries the BOS when there is one
        ids += lead + prompt_ids + body_ids + [eos]
        labels += [IGNORE] * len(lead) + [IGNORE] * len(prompt_ids) + body_ids + [eos]
    return ids, labels


def end_of_text(tokenizer: Tokenizer) -> int:
    """The token that separates documents: the tokenizer's eos_token, else its lowest EOS id."""
    named = tokenizer.special_tokens.get("eos_token")
    token = tokenizer.token_to_id(named) if named else None
    if token is None:
        if not tokenizer.eos_ids:
            raise PocketLMError(
                "the model's tokenizer has no end-of-text token to separate documents"
            )
        token = min(tokenizer.eos_ids)
    return token


def pack(ids: list[int], labels: list[int], *, block_size: int, pad_id: int) -> Blocks:
    """Cut the stream into (N, block_size) blocks; the tail is padded, with labels -100."""
    n = -(-len(ids) // block_size)
    pad = n * block_size - len(ids)
    inputs = torch.tensor(ids + [pad_id] * pad, dtype=torch.long).view(n, block_size)
    targets = torch.tensor(labels + [IGNORE] * pad, dtype=torch.long).view(n, block_size)
    return Blocks(inputs, targets)


def split(blocks: Blocks, *, val_fraction: float, seed: int) -> tuple[Blocks, Blocks | None]:
    """Hold out about `val_fraction` of the blocks (at least one, when there are two or
    more), chosen by a seeded shuffle so a resumed run gets the same split."""
    if not 0 <= val_fraction < 1:
        raise PocketLMError(f"--val-fraction must be in [0, 1) (got {val_fraction})")
    n = len(blocks)
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 and n >= 2 else 0
    if n_val == 0:
        return blocks, None
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return blocks.subset(sorted(order[n_val:])), blocks.subset(sorted(order[:n_val]))


def load_dataset(
    path: Path,
    tokenizer: Tokenizer,
    *,
    block_size: int,
    context_length: int,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """Read, tokenize, pack and split DATA for a model with `context_length` positions."""
    if block_size < 2:
        raise PocketLMError(f"--block-size must be at least 2 (got {block_size})")
    if block_size > context_length:
        raise PocketLMError(
            f"--block-size {block_size} is larger than the model's context of {context_length} tokens"
        )
    ids, labels = tokenize(read_documents(path), tokenizer)
    if all(label == IGNORE for label in labels):
        raise PocketLMError(f"{path} has no tokens to learn from")
    blocks = pack(ids, labels, block_size=block_size, pad_id=end_of_text(tokenizer))
    train, val = split(blocks, val_fraction=val_fraction, seed=seed)
    return Dataset(train, val, tokens=len(ids))
