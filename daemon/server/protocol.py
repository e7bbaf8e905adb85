"""The wire protocol's shapes: the errors every route answers with, and the frames and JSON
objects the routes send back (native msgpack stream frames; OpenAI's completion objects,
chunks and usage). Parsing request bodies is `requests`. A leaf module: no aiohttp, no torch.
"""

from __future__ import annotations

import time
from typing import Any

NATIVE_STREAM_TYPE = "application/vnd.inflightd.stream+msgpack"
MSGPACK_TYPE = "application/msgpack"
# What /v1/generate accepts as its body's Content-Type (anything else: 415).
MSGPACK_TYPES = frozenset({MSGPACK_TYPE, "application/x-msgpack", "application/vnd.msgpack"})

class ProtocolError(Exception):
    """A request the server refuses; `status` is the HTTP status, `type` OpenAI's error type."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.headers: dict[str, str] = {}


def error_body(type: str, message: str, param: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"type": type, "message": message}
    if param is not None:
        err["param"] = param
    return {"error": err}


def native_start(request_id: str, prompt_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"type": "start", "id": request_id, "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens}


def native_delta(text: str, token_ids: list[int], logprobs: list[float] | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "delta", "text": text, "token_ids": token_ids}
    if logprobs is not None:
        frame["logprobs"] = logprobs
    return frame


def native_end(finish_reason: str, usage: dict[str, int], timing: dict[str, float]) -> dict[str, Any]:
    return {"type": "end", "finish_reason": finish_reason, "usage": usage, "timing": timing}


def native_error(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "status": status, "message": message}


def openai_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_completion(
    request_id: str, model: str, text: str, finish_reason: str | None, usage: dict[str, Any],
    logprobs: dict[str, Any] | None, created: int | None = None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
    }


def chat_chunk(
    request_id: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None, include_usage: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }
    if include_usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the last
    return chunk


def completion(
    request_id: str, model: str, text: str, finish_reason: str | None, usage: dict[str, Any],
    logprobs: dict[str, Any] | None, created: int | None = None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
        "usage": usage,
    }


def completion_chunk(
    request_id: str, model: str, created: int, text: str, finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None, include_usage: bool = False,
) -> dict[str, Any]:
    chunk = completion(request_id, model, text, finish_reason, {}, logprobs, created)
    del chunk["usage"]
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(request_id: str, model: str, created: int, usage: dict[str, Any], chat: bool) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    }
