"""Wire schemas of the OpenAI-compatible API: the request bodies pocketlm accepts, and the
error envelope every failure is reported in.

Field names, types and defaults follow the OpenAI API reference (completions, chat
completions, embeddings); pocketlm adds top_k, min_p and repetition_penalty as vLLM and
llama.cpp do. Bodies are validated in strict JSON mode, so a string where a number belongs
is an error rather than a guess. Responses are plain dicts built in `convert.py`.
Knows nothing of models, tokenizers or HTTP frameworks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error to send back in OpenAI's format: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type = message, status, type
        self.param, self.code, self.headers = param, code, headers or {}

    @classmethod
    def busy(cls, why: str) -> ApiError:
        """A 429 that asks the client to retry shortly: `why` the server is busy."""
        return cls(
            f"the server is busy: {why}; retry shortly",
            status=429,
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        )

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Wire(BaseModel):
    # Unknown fields are ignored, as clients (LangChain, editors) send extras we do not use.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Wire):
    include_usage: bool = False


class _Sampling(_Wire):
    """Options completions and chat share."""

    model: str | None = None
    lora: str | None = None  # a LoRA adapter the server runs (`serve --lora NAME=PATH`), by name
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Opt-in: keep only the prompt's last k tokens (-1: as many as fit), as vLLM does.
    # Without it a prompt longer than the context is refused, never cut.
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)


class SamplingKnobs(_Wire):
    """The sampling options under OpenAI's names, unchecked: what the other APIs the server
    speaks (Ollama's, Anthropic's) map their own options onto for
    `convert.sampling_params`, which checks them."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None


class CompletionRequest(_Sampling):
    """POST /v1/completions. A prompt is text, a list of texts, token ids or lists of ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class FunctionCall(_Wire):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result: the call it answers

    @property
    def text(self) -> str | None:
        """The content as one text (its text parts joined); None when there is none."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


class FunctionDefinition(_Wire):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(_Wire):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Wire):
    name: str


class NamedToolChoice(_Wire):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Wire):
    """response_format.json_schema: the schema the answer must follow (OpenAI's Structured
    Outputs; `strict` is always honoured: the output is constrained to the schema)."""

    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")  # (BaseModel has .schema)
    strict: bool | None = None


class ResponseFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class EmbeddingRequest(_Wire):
    """POST /v1/embeddings."""

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)


_TAGS = {"str", "int", "float", "bool", "TextPart", "NamedToolChoice"}


def parse(model: type[BaseModel], body: bytes) -> BaseModel:
    """Validate a JSON body; any problem (bad JSON, bad UTF-8, wrong types) -> ApiError 400."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(
            f"the request body is not valid UTF-8 ({error.reason} at byte {error.start})"
        ) from None
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(f"the request body is not valid JSON: {first['msg']}") from None
        # Drop union tags from the location: ("prompt", "list[int]", 1) -> "prompt.1".
        parts = [
            str(p) for p in first["loc"] if not (isinstance(p, str) and (p in _TAGS or "[" in p))
        ]
        param = ".".join(parts) or None
        where = f" in '{param}'" if param else ""
        raise ApiError(f"invalid request{where}: {first['msg']}", param=param) from None
