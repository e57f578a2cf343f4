"""`/openapi.json`: the API's description, for clients and fuzzers (schemathesis).

The routes read their bodies themselves (so that every error is OpenAI's JSON and a
body's size is bounded before it is parsed), which leaves FastAPI's generated document
without request bodies; `describe` puts the wire schemas of `schemas.py` back in, and
names the error responses every route may give. Knows nothing of models.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from pocketlm.serve.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type"],
        }
    },
    "required": ["error"],
}
_ERRORS = {  # status -> what it means, on every POST route
    "400": "invalid request",
    "401": "missing or wrong API key",
    "403": "Host not allowed",
    "404": "unknown model or LoRA adapter",
    "408": "the request arrived too slowly",
    "413": "body too large",
    "415": "body not sent as application/json",
    "429": "queue full",
    "503": "cancelled (server shutting down)",
    "504": "time limit passed",
}


_MEDIA = {  # path -> what a 200 is, where it is not JSON
    "/": ["text/html"],
    "/metrics": ["text/plain"],
    "/v1/completions": ["application/json", "text/event-stream"],
    "/v1/chat/completions": ["application/json", "text/event-stream"],
}


def describe(app: FastAPI) -> None:
    """Serve FastAPI's document with the request bodies, media types and errors added."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas["Error"] = _ERROR
            for path, operations in spec.get("paths", {}).items():
                for method, operation in operations.items():
                    _complete(operation, path=path, post=method == "post", schemas=schemas)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


def _complete(operation: dict, *, path: str, post: bool, schemas: dict) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)  # FastAPI's own validation error; this server sends 400
    if path in _MEDIA:
        responses["200"] = {
            "description": "OK",
            "content": {media: {"schema": {}} for media in _MEDIA[path]},
        }
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for status, text in _ERRORS.items():
        if post or status in ("401", "403", "404", "408"):
            responses[status] = {"description": text, "content": error}
    model = BODIES.get(path) if post else None
    if model is not None:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref}},
        }
