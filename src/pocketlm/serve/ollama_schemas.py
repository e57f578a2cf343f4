"""Wire schemas of Ollama's API: the request bodies of /api/generate, /api/chat,
/api/embed, /api/embeddings and /api/show, and the model options pocketlm honours, as
ollama's `api/types.go` and the official `ollama` Python client define them. Unknown fields
are ignored (Ollama ignores them too); answers are plain dicts built in `ollama.py`.
Knows nothing of models, tokenizers or HTTP frameworks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pocketlm.serve.schemas import _Wire


class Options(_Wire):
    """The model options pocketlm honours; the runner's (num_gpu, num_thread, use_mmap...)
    are ignored, as they mean nothing here."""

    temperature: float | None = Field(default=None, ge=0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    num_predict: int | None = Field(default=None, ge=-2)
    num_ctx: int | None = Field(default=None, ge=1)
    stop: list[str] | None = None
    repeat_penalty: float | None = Field(default=None, gt=0)
    repeat_last_n: int | None = None  # accepted: pocketlm's penalty covers the whole text
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    mirostat: int | None = None  # refused unless 0 (off)
    typical_p: float | None = None  # refused unless 1 (off)


class _Optioned(_Wire):
    model: str | None = None
    options: Options = Options()

    @field_validator("options", mode="before")
    @classmethod
    def _none_is_empty(cls, value: object) -> object:
        return {} if value is None else value


class _Generating(_Optioned):
    format: str | dict | None = None
    stream: bool | None = None  # Ollama streams unless told `false`
    keep_alive: float | str | None = None
    think: bool | str | None = None
    logprobs: bool = False
    # pocketlm's opt-in: keep the prompt's last tokens when it does not fit the context.
    truncate: bool = False


class GenerateRequest(_Generating):
    prompt: str = ""
    system: str | None = None
    context: list[int] | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    images: list[str] | None = None


class Message(_Wire):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    images: list[str] | None = None
    tool_calls: list[dict] | None = None
    thinking: str | None = None


class ChatRequest(_Generating):
    messages: list[Message] = []
    tools: list[dict] | None = None


class EmbedRequest(_Optioned):
    input: str | list[str]
    truncate: bool = False  # Ollama's default is true; pocketlm never cuts unasked
    keep_alive: float | str | None = None
    dimensions: int | None = Field(default=None, ge=1)


class EmbeddingsRequest(_Optioned):
    """The older /api/embeddings."""

    prompt: str = ""
    keep_alive: float | str | None = None


class ShowRequest(_Wire):
    model: str | None = None
    name: str | None = None  # the older clients' field
    verbose: bool = False
