"""Parsing request bodies: the native msgpack route's and the OpenAI-compatible routes' into one
`GenerateRequest` (with its checked `SamplingParams`). A leaf module (no aiohttp, no torch):
every check raises `ProtocolError` with the HTTP status and a message naming the key, and the
server maps it to a response in one place.

Native (`POST /v1/generate`, msgpack): unknown keys and wrong types are refused. OpenAI routes:
unknown keys are ignored, as OpenAI's own server and vLLM do (clients add fields freely), but a
known field we do not implement (tools, n > 1, echo, …) is refused by name instead of being
silently dropped, since the answer would not be what the client asked for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..checks import is_finite_number, is_int
from ..engine.sampling_params import SEED_MAX, SEED_MIN, SamplingParams, SamplingParamsError
from .protocol import ProtocolError

# Deepest nesting of a request body. An OpenAI chat body is 5 levels deep (body, messages, a
# message, content parts, a part); JSON schemas for structured output go deeper, rarely past 20.
# Bounded so that nothing that walks a body recursively (repr, a template) can overflow the stack.
MAX_DEPTH = 64
MAX_STOP = 16  # stop strings per request: each is searched for after every token
# Integers in a body beyond this magnitude are refused by name, whatever the field.
_INT_LIMIT = 1 << 63
# OpenAI's roles that a chat template renders. "developer" is OpenAI's newer name for the
# system message and is rendered as one.
ROLES = frozenset({"system", "developer", "user", "assistant"})


@dataclass
class GenerateRequest:
    """What any route asks of the engine, before tokenization.

    Exactly one of `prompt` (text or token ids) and `messages` is set. `params` holds every
    sampling field the client gave, checked; its `max_tokens` is the client's or, when
    `max_tokens` is None (left to the server: the configured default, capped by the context
    left), a placeholder the server replaces."""

    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=1))
    stream: bool = True
    include_usage: bool = False
    priority: int = 0
    model: str | None = None
    top_logprobs: int = 0  # OpenAI chat: how many alternatives per token when logprobs is on


def _params(req: GenerateRequest, sampling: dict[str, Any]) -> None:
    """Build the request's SamplingParams from the fields parsed into `sampling`."""
    try:
        req.params = SamplingParams(max_tokens=req.max_tokens or 1, **sampling)
    except SamplingParamsError as e:
        raise ProtocolError(400, str(e), param=str(e).split(":", 1)[0]) from None


# ---------------------------------------------------------------------------------- bodies


def check_depth(obj: object, limit: int = MAX_DEPTH) -> None:
    """Refuse a decoded body nested deeper than `limit` (iterative: no recursion to overflow)."""
    stack: list[tuple[object, int]] = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        if isinstance(o, Mapping):
            children: Any = [*o.keys(), *o.values()]
        elif isinstance(o, (list, tuple)):
            children = o
        else:
            continue
        if depth > limit:
            raise ProtocolError(400, f"the body is nested more than {limit} levels deep")
        stack.extend((c, depth + 1) for c in children if isinstance(c, (Mapping, list, tuple)))


def decode_json(body: bytes) -> Any:
    """A JSON body, or ProtocolError(400) saying what is wrong with it."""
    try:
        obj = json.loads(body)
    except RecursionError:
        raise ProtocolError(400, f"the body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of over 4300 digits
        raise ProtocolError(400, f"the body is not valid JSON: {str(e).split(';')[0]}") from None
    check_depth(obj)
    return obj


def decode_msgpack(body: bytes) -> Any:
    """A msgpack body (exactly one object), or ProtocolError(400) saying what is wrong."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except msgpack.StackError:
        raise ProtocolError(400, f"the body is nested more than {MAX_DEPTH} levels deep") from None
    except msgpack.ExtraData:
        raise ProtocolError(400, "the body holds more than one msgpack object") from None
    except Exception as e:  # msgpack raises several unrelated types for bad input
        reason = str(e) or type(e).__name__
        raise ProtocolError(400, f"the body is not one valid msgpack map: {reason}") from None
    check_depth(obj)
    return obj


# ---------------------------------------------------------------------------------- checks


def _is_int(v: object) -> bool:
    return is_int(v) and -_INT_LIMIT <= v < _INT_LIMIT


def _bad(key: str, why: str, value: object) -> ProtocolError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ProtocolError(400, f"{key}: {why} (got {shown})", param=key)


def _int(obj: Mapping[str, Any], key: str, *, low: int | None = None, high: int | None = None) -> int | None:
    """An optional integer field; without bounds of its own it must fit in 64 bits."""
    v = obj.get(key)
    if v is None:
        return None
    if not is_int(v):
        raise _bad(key, "must be an integer", v)
    lo = -_INT_LIMIT if low is None else low
    hi = _INT_LIMIT - 1 if high is None else high
    if not lo <= v <= hi:
        bounds = f"≥ {lo}" if v < lo and high is None else f"in [{lo}, {hi}]"
        raise _bad(key, f"must be {bounds}", v)
    return int(v)


def _num(obj: Mapping[str, Any], key: str) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if not is_finite_number(v):
        raise _bad(key, "must be a finite number", v)
    return float(v)


def _bool(obj: Mapping[str, Any], key: str) -> bool | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise _bad(key, "must be true or false", v)
    return v


def _stop(obj: Mapping[str, Any], key: str = "stop", *, allow_str: bool = True) -> tuple[str, ...] | None:
    v = obj.get(key)
    if v is None:
        return None
    if allow_str and isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise _bad(key, "must be a list of non-empty strings" + (" or one string" if allow_str else ""), v)
    if len(v) > MAX_STOP:
        raise ProtocolError(400, f"{key}: at most {MAX_STOP} stop sequences (got {len(v)})", param=key)
    return tuple(v)


def _token_ids(v: object, key: str) -> list[int]:
    if not isinstance(v, list) or not all(_is_int(t) and t >= 0 for t in v):
        raise _bad(key, "must be a list of non-negative integer token ids", v)
    return [int(t) for t in v]


def _messages(v: object, key: str = "messages") -> list[dict[str, Any]]:
    if not isinstance(v, list) or not v:
        raise _bad(key, "must be a non-empty list of {role, content} maps", v)
    out: list[dict[str, Any]] = []
    for i, m in enumerate(v):
        where = f"{key}[{i}]"
        if not isinstance(m, Mapping):
            raise _bad(where, "must be a map with role and content", m)
        role = m.get("role")
        if role in ("tool", "function") or m.get("tool_calls"):
            raise ProtocolError(400, f"{where}: tool calls are not supported", param=where)
        if not isinstance(role, str) or role not in ROLES:
            raise _bad(f"{where}.role", f"must be one of {', '.join(sorted(ROLES))}", role)
        if role == "developer":
            role = "system"
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, Mapping) else part
                    raise ProtocolError(
                        400, f"{where}.content[{j}]: only text parts are supported (got {kind!r})",
                        param=f"{where}.content",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise _bad(f"{where}.content", "must be a string or a list of text parts", content)
        entry: dict[str, Any] = {"role": role, "content": content}
        if isinstance(m.get("name"), str):
            entry["name"] = m["name"]
        out.append(entry)
    return out


def _common_sampling(obj: Mapping[str, Any], out: dict[str, Any]) -> None:
    """Keys shared by all routes, with the same meaning: into SamplingParams kwargs."""
    for key in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        v = _num(obj, key)
        if v is not None:
            out[key] = v
    top_k = _int(obj, "top_k", low=-1)
    if top_k is not None:
        out["top_k"] = max(top_k, 0)  # vLLM's -1 means off, as our 0 does
    seed = _int(obj, "seed", low=SEED_MIN, high=SEED_MAX)
    if seed is not None:
        out["seed"] = seed
    ignore_eos = _bool(obj, "ignore_eos")
    if ignore_eos is not None:
        out["ignore_eos"] = ignore_eos
    if obj.get("stop_token_ids") is not None:
        out["stop_token_ids"] = tuple(_token_ids(obj["stop_token_ids"], "stop_token_ids"))


# ---------------------------------------------------------------------------------- native

NATIVE_KEYS = frozenset(
    {
        "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
        "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids", "priority", "stream",
        # extensions beyond the list the protocol started with
        "ignore_eos", "logprobs",
    }
)


def parse_native(obj: object) -> GenerateRequest:
    if not isinstance(obj, Mapping):
        raise ProtocolError(400, f"the body must be one msgpack map, got {type(obj).__name__}")
    for key in obj:
        if key not in NATIVE_KEYS:
            raise ProtocolError(400, f"{key!r}: unknown key (known: {', '.join(sorted(NATIVE_KEYS))})", param=str(key))
    req = GenerateRequest()
    sampling: dict[str, Any] = {}
    _prompt_or_messages(obj, req)
    req.max_tokens = _int(obj, "max_tokens", low=1)
    _common_sampling(obj, sampling)
    stop = _stop(obj, allow_str=False)
    if stop is not None:
        sampling["stop"] = stop
    logprobs = _int(obj, "logprobs", low=0, high=20)
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    req.priority = _int(obj, "priority") or 0
    stream = _bool(obj, "stream")
    req.stream = True if stream is None else stream
    _params(req, sampling)
    return req


def _prompt_or_messages(obj: Mapping[str, Any], req: GenerateRequest) -> None:
    has_prompt, has_messages = obj.get("prompt") is not None, obj.get("messages") is not None
    if has_prompt == has_messages:
        raise ProtocolError(400, "give exactly one of 'prompt' (text or token ids) and 'messages'", param="prompt")
    if has_messages:
        req.messages = _messages(obj["messages"])
        return
    p = obj["prompt"]
    if isinstance(p, str):
        if not p:
            raise _bad("prompt", "must not be empty", p)
        req.prompt = p
    else:
        ids = _token_ids(p, "prompt")
        if not ids:
            raise _bad("prompt", "must not be empty", p)
        req.prompt = ids


# ---------------------------------------------------------------------------------- OpenAI

# Fields of OpenAI's API that we know and do not implement: refused by name.
_UNSUPPORTED_CHAT = ("tools", "tool_choice", "functions", "function_call", "audio", "prediction", "modalities")


def _openai_common(obj: Mapping[str, Any], req: GenerateRequest, sampling: dict[str, Any]) -> None:
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "must be a string", model)
    req.model = model
    n = _int(obj, "n", low=1)
    if n is not None and n != 1:
        raise ProtocolError(400, f"n: only n = 1 is supported (got {n})", param="n")
    _common_sampling(obj, sampling)
    stop = _stop(obj)
    if stop is not None:
        sampling["stop"] = stop
    bias = obj.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, Mapping):
            raise _bad("logit_bias", "must map token ids to numbers", bias)
        sampling["logit_bias"] = dict(bias)
    user = obj.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", "must be a string", user)
    stream = _bool(obj, "stream")
    req.stream = bool(stream)
    opts = obj.get("stream_options")
    if opts is not None:
        if not isinstance(opts, Mapping):
            raise _bad("stream_options", "must be an object", opts)
        if not req.stream:
            raise ProtocolError(400, "stream_options: only allowed with stream: true", param="stream_options")
        req.include_usage = bool(_bool(opts, "include_usage"))
    priority = _int(obj, "priority")
    if priority is not None:
        req.priority = priority


def parse_chat(obj: object) -> GenerateRequest:
    if not isinstance(obj, Mapping):
        raise ProtocolError(400, "the body must be a JSON object")
    for key in _UNSUPPORTED_CHAT:
        if obj.get(key) not in (None, [], "none"):
            raise ProtocolError(400, f"{key}: not supported by this server", param=key)
    fmt = obj.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise ProtocolError(400, "response_format: only {\"type\": \"text\"} is supported", param="response_format")
    if obj.get("messages") is None:
        raise ProtocolError(400, "messages: required", param="messages")
    req = GenerateRequest(messages=_messages(obj["messages"]))
    sampling: dict[str, Any] = {}
    _openai_common(obj, req, sampling)
    mct, mt = _int(obj, "max_completion_tokens", low=1), _int(obj, "max_tokens", low=1)
    req.max_tokens = mct if mct is not None else mt
    logprobs = _bool(obj, "logprobs")
    top = _int(obj, "top_logprobs", low=0, high=20)
    if top is not None and not logprobs:
        raise ProtocolError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    if logprobs:
        req.top_logprobs = top or 0
        sampling["logprobs"] = req.top_logprobs
    _params(req, sampling)
    return req


def parse_completion(obj: object) -> GenerateRequest:
    if not isinstance(obj, Mapping):
        raise ProtocolError(400, "the body must be a JSON object")
    if obj.get("echo"):
        raise ProtocolError(400, "echo: not supported by this server", param="echo")
    if obj.get("suffix"):
        raise ProtocolError(400, "suffix: not supported by this server", param="suffix")
    best_of = _int(obj, "best_of", low=1)
    if best_of is not None and best_of != 1:
        raise ProtocolError(400, f"best_of: only 1 is supported (got {best_of})", param="best_of")
    p = obj.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    req = GenerateRequest()
    if isinstance(p, str) and p:
        req.prompt = p
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        req.prompt = _token_ids(p, "prompt")
    elif isinstance(p, list) and len(p) > 1:
        raise ProtocolError(400, f"prompt: batches are not supported, send one prompt per request (got {len(p)})",
                            param="prompt")
    else:
        raise _bad("prompt", "must be a non-empty string or list of token ids", p)
    sampling: dict[str, Any] = {}
    _openai_common(obj, req, sampling)
    req.max_tokens = _int(obj, "max_tokens", low=1)
    logprobs = _int(obj, "logprobs", low=0, high=5)
    if logprobs is not None:
        sampling["logprobs"] = logprobs
        req.top_logprobs = logprobs
    _params(req, sampling)
    return req
