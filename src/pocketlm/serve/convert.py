"""Pure translation between the OpenAI wire format and the engine.

Wire request -> engine parameters (sampling params, prompt ids, stop strings, token
budget), and engine events -> response objects and server-sent-event chunks, shaped as
the OpenAI API reference and the official `openai` client expect them. No I/O, no model:
each function is a plain function of its arguments (a tokenizer is only read), so each
is unit-tested on hand-built inputs. (vLLM `entrypoints/openai/serving_*.py`, ollama
`openai/openai.go`.)
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from pocketlm.errors import PocketLMError
from pocketlm.generate.constraint import Grammar
from pocketlm.prompting.chat import Harness, Turn
from pocketlm.prompting.tools import DEFAULT, chat_messages, tool_format
from pocketlm.prompting.tools import render as render_tools
from pocketlm.sampling import SamplingParams
from pocketlm.serve.scheduler import Event
from pocketlm.serve.schemas import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponseFormat,
    SamplingKnobs,
)
from pocketlm.serve.tools import plain_messages
from pocketlm.tokenizer import Tokenizer

# -- requests -> engine ----------------------------------------------------------------------


def sampling_params(
    request: CompletionRequest | ChatCompletionRequest | SamplingKnobs, *, vocab_size: int
) -> SamplingParams:
    """SamplingParams from a request. OpenAI's defaults: temperature 1, top_p 1."""
    bias = {}
    for key, value in (request.logit_bias or {}).items():
        if not key.lstrip("-").isdigit():
            raise ApiError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
        bias[int(key)] = value
    params = SamplingParams(
        temperature=_default(request.temperature, 1.0),
        top_k=_default(request.top_k, 0),
        top_p=_default(request.top_p, 1.0),
        min_p=_default(request.min_p, 0.0),
        repetition_penalty=_default(request.repetition_penalty, 1.0),
        presence_penalty=_default(request.presence_penalty, 0.0),
        frequency_penalty=_default(request.frequency_penalty, 0.0),
        logit_bias=bias,
        seed=request.seed,
    )
    try:
        params.validate(vocab_size=vocab_size)
    except PocketLMError as error:
        raise ApiError(str(error)) from None
    return params


def response_grammar(response_format: ResponseFormat | None) -> Grammar | None:
    """The grammar a chat request's response_format asks for: any JSON object, or JSON
    valid under the given schema (an unusable schema is a 400 naming what it uses)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Grammar.json_object()
    spec = response_format.json_schema
    if spec is None or spec.schema_ is None:
        raise ApiError(
            "response_format json_schema needs json_schema.schema", param="response_format"
        )
    try:
        return Grammar.json_schema(spec.schema_)
    except PocketLMError as error:
        raise ApiError(str(error), param="response_format") from None


def _default(value, fallback):  # noqa: ANN001, ANN202 - a typed `or` that keeps 0
    return fallback if value is None else value


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request uses seed + i: the n choices differ, and choice 0 is
    what the same request with n=1 gives."""
    return None if seed is None else seed + index


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise ApiError("at most 4 stop sequences are allowed", param="stop")
    if any(not s for s in stops):
        raise ApiError("stop sequences must not be empty strings", param="stop")
    return tuple(stops)


def prompt_ids(prompt: str | list, tokenizer: Tokenizer, *, vocab_size: int) -> list[list[int]]:
    """The prompts of a completions request as token ids (text, texts, ids or lists of ids)."""
    if isinstance(prompt, str):
        batches = [tokenizer.encode(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        batches = tokenizer.encode_batch(prompt)
    elif prompt and all(isinstance(p, int) for p in prompt):
        batches = [list(prompt)]
    else:
        batches = [list(p) for p in prompt]
    if not batches or any(not ids for ids in batches):
        raise ApiError("the prompt is empty", param="prompt")
    for ids in batches:
        if any(not 0 <= i < vocab_size for i in ids):
            raise ApiError(f"prompt token ids must be in 0..{vocab_size - 1}", param="prompt")
    return batches


def chat_prompt(
    messages: Sequence[ChatMessage], tokenizer: Tokenizer, *, tools: Sequence[dict] | None = None
) -> tuple[list[int], tuple[str, ...]]:
    """(prompt ids, extra stop strings) for a conversation: the model's chat template when
    it has one, else the base-model transcript harness of `pocketlm.prompting.chat`, which stops
    before the next "User:" line. `tools` (wire definitions) are offered in the prompt;
    earlier tool calls and results render either way (`pocketlm.prompting.tools`)."""
    plain = plain_messages(list(messages))
    fmt = tool_format(tokenizer.chat_template)
    with_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in plain)
    try:
        if tokenizer.chat_template is not None:
            for m in plain:  # templates know "system"; "developer" is OpenAI's newer name for it
                m["role"] = "system" if m["role"] == "developer" else m["role"]
            if with_tools:
                text = render_tools(tokenizer.render_chat, plain, fmt, tools)
            else:
                text = tokenizer.render_chat(plain, add_generation_prompt=True)
            return tokenizer.encode(text, add_bos=False), ()
        plain, _ = chat_messages(plain, DEFAULT, tools)  # calls and results as plain turns
    except PocketLMError as error:
        raise ApiError(str(error), param="messages") from None
    plain = [{"role": m["role"], "content": m["content"] or ""} for m in plain]
    harness = Harness()
    system, turns, message = transcript_turns(plain)
    text = harness.render(system=system, turns=turns, message=message)
    return tokenizer.encode(text), tuple(harness.stops)


def transcript_turns(messages: list[dict]) -> tuple[str | None, list[Turn], str]:
    """(system prompt, past turns, the last user message) for the transcript harness.
    System messages join into one; consecutive messages of one side join with newlines."""
    system = (
        "\n".join(m["content"] for m in messages if m["role"] in ("system", "developer")) or None
    )
    talk = [m for m in messages if m["role"] not in ("system", "developer")]
    if not talk or talk[-1]["role"] != "user":
        raise ApiError(
            "the last message must be from the user for this model (it has no chat template)",
            param="messages",
        )
    turns, user, assistant = [], [], []
    for m in talk[:-1]:
        if m["role"] == "assistant":
            assistant.append(m["content"])
            continue
        if assistant:
            turns.append(Turn("\n".join(user), " " + "\n".join(assistant)))
            user, assistant = [], []
        user.append(m["content"])
    if assistant or user:
        turns.append(Turn("\n".join(user), " " + "\n".join(assistant)))
    return system, turns, talk[-1]["content"]


TRUNCATE_HINT = "shorten it, or send truncate_prompt_tokens to keep only its last tokens"


def token_budget(
    *,
    prompt_tokens: int,
    max_tokens: int | None,
    context_length: int,
    param: str = "max_tokens",
    hint: str = TRUNCATE_HINT,
    window: str = "this model's context",
    default: int | None = None,
) -> int:
    """New tokens allowed: `max_tokens`; when None, the server's `default` cut to the room
    left (all the room left when that is None too). The prompt plus
    the budget must fit the context window (called `window` in the messages): a request
    that does not is refused with the numbers, never cut quietly (`truncate_prompt` is
    the opt-in)."""
    room = context_length - prompt_tokens
    if room < 1:
        full = "" if room < 0 else ", which leaves no room for a reply"
        raise ApiError(
            f"prompt has {prompt_tokens:,} tokens; {window} is {context_length:,}{full} ({hint})",
            param="messages" if param != "max_tokens" else "prompt",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        # Not the whole window: a client that leaves max_tokens out would otherwise wait
        # for thousands of tokens (llama.cpp and Ollama cap it too).
        return room if default is None else min(default, room)
    if max_tokens > room:
        raise ApiError(
            f"{param} is {max_tokens:,}, but the prompt has {prompt_tokens:,} tokens and "
            f"{window} is {context_length:,}: {param} can be at most {room:,}",
            param=param,
            code="context_length_exceeded",
        )
    return max_tokens


def truncate_prompt(
    ids: list[int], keep: int | None, *, max_tokens: int | None, context_length: int
) -> list[int]:
    """The prompt as a request that opted into truncation asked (vLLM's
    `truncate_prompt_tokens`): its last `keep` tokens; -1 keeps as many as leave room for
    `max_tokens` (one new token when None). None: the prompt unchanged."""
    if keep is None:
        return ids
    if keep == 0:
        raise ApiError(
            "truncate_prompt_tokens must be at least 1, or -1 for as many as fit",
            param="truncate_prompt_tokens",
        )
    if keep == -1:
        keep = context_length - (max_tokens or 1)
    return ids[-keep:] if 0 < keep < len(ids) else ids


# -- engine events -> a choice ---------------------------------------------------------------


@dataclass
class Choice:
    """What a choice has accumulated from its events."""

    index: int
    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stop_sequence: str | None = None  # the stop string that ended it, if one did

    def add(self, event: Event) -> None:
        self.text.append(event.text)
        if event.token is not None:
            self.tokens.append(event.token)
            self.logprobs.append(event.logprob)
            self.top_logprobs.append(event.top_logprobs)
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.finish_reason is not None:
            self.finish_reason, self.stop_sequence = event.finish_reason, event.stop_sequence
            self.prompt_tokens, self.completion_tokens = (
                event.prompt_tokens,
                event.completion_tokens,
            )


def engine_failure(reason: str | None, *, timeout: float | None) -> ApiError | None:
    """The error a request's finish reason stands for, or None when it finished normally."""
    if reason == "timeout":
        return ApiError(
            f"the request took longer than the server's limit of {timeout:g} s",
            status=504,
            type="timeout_error",
            code="timeout",
        )
    if reason == "error":
        return ApiError("generation error", status=500, type="server_error")
    if reason == "cancelled":  # the client left (nobody reads this), or the server stops
        return ApiError(
            "generation cancelled: the server is shutting down", status=503, type="server_error"
        )
    return None


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def completion_logprobs(
    choice: Choice, tokenizer: Tokenizer, *, prompt: list[int] | None = None, start: int = 0
) -> dict:
    """The completions `logprobs` object; with `prompt` (echo), its tokens come first (the
    first has no logprob). `start` is the text offset of the first token."""
    tokens, values, tops = (
        list(choice.tokens),
        list(choice.logprobs),
        [dict_top(t, tokenizer) for t in choice.top_logprobs],
    )
    if prompt is not None:
        prompt_lp = choice.prompt_logprobs or [None] * len(prompt)
        tokens, values = prompt + tokens, list(prompt_lp) + values
        tops = [None] * len(prompt) + tops
    texts = [_token_text(tokenizer, t) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(start)
        start += len(text)
    has_top = any(choice.top_logprobs)
    return {
        "tokens": texts,
        "token_logprobs": values,
        "top_logprobs": tops if has_top else None,
        "text_offset": offsets,
    }


def dict_top(top: list[tuple[int, float]], tokenizer: Tokenizer) -> dict[str, float]:
    return {_token_text(tokenizer, t): lp for t, lp in top}


def chat_logprobs(choice: Choice, tokenizer: Tokenizer) -> dict:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def entry(token: int, logprob: float) -> dict:
        return {
            "token": _token_text(tokenizer, token),
            "logprob": logprob,
            "bytes": list(tokenizer.token_bytes(token)),
        }

    content = []
    for token, logprob, top in zip(
        choice.tokens, choice.logprobs, choice.top_logprobs, strict=True
    ):
        content.append({**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]})
    return {"content": content, "refusal": None}


# -- responses --------------------------------------------------------------------------------


def completion_response(
    *, id: str, created: int, model: str, choices: list[dict], usage: dict
) -> dict:
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
        "system_fingerprint": None,
    }


def completion_choice(
    index: int, text: str, *, logprobs: dict | None, finish_reason: str | None
) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_chunk(
    *, id: str, created: int, model: str, choices: list[dict], usage: dict | None = None
) -> dict:
    chunk = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": None,
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def chat_response(*, id: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
        "system_fingerprint": None,
    }


def chat_choice(
    index: int,
    text: str,
    *,
    logprobs: dict | None,
    finish_reason: str | None,
    message: dict | None = None,
) -> dict:
    """A choice of a chat.completion (`message`: one with tool calls, instead of `text`)."""
    message = message or {"role": "assistant", "content": text, "refusal": None}
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def chat_chunk(
    *,
    id: str,
    created: int,
    model: str,
    choices: list[dict],
    usage: dict | None = None,
    include_usage: bool = False,
) -> dict:
    """A chat.completion.chunk; with include_usage every chunk has "usage" (null but the last)."""
    chunk = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": None,
    }
    if include_usage or usage is not None:
        chunk["usage"] = usage
    return chunk


def chat_delta(
    index: int,
    *,
    content: str | None = None,
    role: str | None = None,
    logprobs: dict | None = None,
    finish_reason: str | None = None,
    tool_calls: list[dict] | None = None,
) -> dict:
    delta = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def sse(data: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (`[DONE]` as is)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


def embedding_response(
    vectors: list[list[float]], *, model: str, prompt_tokens: int, encoding_format: str
) -> dict:
    def encode(vector: list[float]) -> list[float] | str:
        if encoding_format == "base64":  # little-endian float32, as OpenAI sends it
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    data = [
        {"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def model_entry(name: str, *, created: int, loaded: bool) -> dict:
    """A model in /v1/models; `loaded` (pocketlm's own field): in memory now."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "pocketlm",
        "loaded": loaded,
    }


METRICS = {  # name in the snapshot -> (Prometheus name, type, help)
    "requests": (
        "pocketlm_requests_total",
        "counter",
        "Generation requests accepted (one per choice).",
    ),
    "finished": (
        "pocketlm_requests_finished_total",
        "counter",
        "Requests that ran to a stop or length.",
    ),
    "cancelled": (
        "pocketlm_requests_cancelled_total",
        "counter",
        "Requests whose client went away.",
    ),
    "timed_out": ("pocketlm_requests_timed_out_total", "counter", "Requests past the time limit."),
    "rejected": (
        "pocketlm_requests_rejected_total",
        "counter",
        "Submissions refused: queue full (429).",
    ),
    "errors": (
        "pocketlm_request_errors_total",
        "counter",
        "Requests that failed inside the engine.",
    ),
    "prompt_tokens": ("pocketlm_prompt_tokens_total", "counter", "Prompt tokens prefilled."),
    "embedding_requests": (
        "pocketlm_embedding_requests_total",
        "counter",
        "Embedding requests accepted.",
    ),
    "embedding_inputs": ("pocketlm_embedding_inputs_total", "counter", "Inputs embedded."),
    "generation_tokens": ("pocketlm_generation_tokens_total", "counter", "Tokens generated."),
    "steps": ("pocketlm_decode_steps_total", "counter", "Batched decode steps run."),
    "queue_depth": ("pocketlm_queue_depth", "gauge", "Requests waiting for a batch slot."),
    "active": ("pocketlm_active_requests", "gauge", "Requests in the batch now."),
    "max_batch": ("pocketlm_max_batch", "gauge", "Batch slots."),
    "kv_cache_bytes": ("pocketlm_kv_cache_bytes", "gauge", "Bytes of KV cache held now."),
    "tokens_per_second": (
        "pocketlm_tokens_per_second",
        "gauge",
        "Tokens generated per second, last 10 s.",
    ),
    # the prefix cache (serve/prefix_cache.py), when it is on
    "prefix_cache_hits": (
        "pocketlm_prefix_cache_hits_total",
        "counter",
        "Prompts that reused a cached prefix.",
    ),
    "prefix_cache_misses": (
        "pocketlm_prefix_cache_misses_total",
        "counter",
        "Prompts that found no cached prefix.",
    ),
    "prefix_cache_reused_tokens": (
        "pocketlm_prefix_cache_reused_tokens_total",
        "counter",
        "Prompt tokens copied from the prefix cache instead of computed.",
    ),
    "prefix_cache_evicted_blocks": (
        "pocketlm_prefix_cache_evicted_blocks_total",
        "counter",
        "Prefix cache blocks evicted to stay within --cache-ram.",
    ),
    "prefix_cache_bytes": (
        "pocketlm_prefix_cache_bytes",
        "gauge",
        "Bytes of keys and values the prefix cache holds.",
    ),
    "prefix_cache_blocks": (
        "pocketlm_prefix_cache_blocks",
        "gauge",
        "Token blocks the prefix cache holds.",
    ),
}


def prometheus(snapshot: dict[str, float]) -> str:
    """Prometheus text exposition format (version 0.0.4) of a scheduler snapshot."""
    return _exposition({"": snapshot})


def prometheus_by_model(snapshots: dict[str, dict[str, float]]) -> str:
    """The same with a series per model, labelled `model="<name>"`."""
    labels = {n: n.replace("\\", "\\\\").replace('"', '\\"') for n in snapshots}
    return _exposition({f'{{model="{labels[n]}"}}': s for n, s in snapshots.items()})


def _exposition(series: dict[str, dict[str, float]]) -> str:
    lines = []
    for key, (name, kind, help_text) in METRICS.items():
        samples = [(label, s[key]) for label, s in series.items() if key in s]
        if samples:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for label, value in samples:
            shown = f"{value:.6g}" if isinstance(value, float) else f"{value}"
            lines.append(f"{name}{label} {shown}")
    return "\n".join(lines) + "\n"
