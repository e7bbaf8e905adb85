"""The aiohttp application: routes, peer checks, bounded bodies, and errors mapped to HTTP in
one place (`_errors`). The native msgpack stream lives here; the OpenAI routes in
`openai_routes.py`; sockets, signals, systemd and drain in `daemon.py`.

Errors: a `ProtocolError` (from parsing, intake or the engine's refusals) becomes its status
with a body `{"error": {"type", "message"}}`, msgpack on the native route and JSON elsewhere.
Once a stream has started, an error can only be a terminal frame (native) or an SSE `error`
event: the status line is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from aiohttp import web

from ..engine.sequence import FinishReason
from . import openai_routes
from .http_io import ALLOW, RELOAD, SERVICE, finish, output_error, prepare, read_body, read_json, send
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .protocol import (
    MSGPACK_TYPE,
    MSGPACK_TYPES,
    NATIVE_STREAM_TYPE,
    ProtocolError,
    error_body,
    native_delta,
    native_end,
    native_error,
    native_start,
)
from .requests import decode_msgpack, parse_native
from .service import ReloadResult, Service
from .sockets import AllowList, peer_cred
from .streams import Prepared

log = logging.getLogger(__name__)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_NATIVE_ROUTES = frozenset({"/v1/generate"})
# Routes that answer while loading or draining; the others get 503 then.
_ALWAYS = frozenset({"/health", "/metrics", "/v1/status", "/v1/reload", "/v1/models"})


def _error_response(request: web.Request, status: int, type: str, message: str, headers: Any = None) -> web.Response:
    body = error_body(type, message)
    if request.path in _NATIVE_ROUTES:
        return web.Response(status=status, body=msgpack.packb(body), content_type=MSGPACK_TYPE, headers=headers)
    return web.json_response(body, status=status, headers=headers)


_HTTP_TYPES = {400: "invalid_request_error", 403: "permission_denied", 404: "not_found", 405: "method_not_allowed",
               408: "request_timeout", 413: "request_too_large", 415: "unsupported_media_type",
               503: "service_unavailable"}
# Refused before the body was read to its end: what is left of it must not be read (a trickled
# or endless body would hold the connection), so the connection closes after the answer.
_CLOSE_AFTER = frozenset({408, 413})


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    app = request.app
    allow = app[ALLOW]
    transport = request.transport
    cred = peer_cred(transport.get_extra_info("socket")) if transport is not None else None
    if cred is not None and not allow.allows(cred):
        log.warning("refused peer pid=%d uid=%d gid=%d", cred.pid, cred.uid, cred.gid)
        return _error_response(request, 403, "permission_denied",
                               f"uid {cred.uid} is not allowed on this socket (listen.allow_uids / allow_groups)")
    service = app[SERVICE]
    if service.state != "ready" and request.path not in _ALWAYS:
        return _error_response(request, 503, "service_unavailable", f"the daemon is {service.state}",
                               headers={"Retry-After": "5"})
    try:
        return await handler(request)
    except ProtocolError as e:
        resp = _error_response(request, e.status, e.type, e.message, headers=e.headers or None)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = e.text if e.status == 413 else f"{e.reason}: {request.method} {request.path}"
        resp = _error_response(request, e.status, _HTTP_TYPES.get(e.status, "error"), message or e.reason,
                               headers={k: v for k, v in e.headers.items() if k in ("Allow", "Retry-After")})
    if resp.status in _CLOSE_AFTER:
        resp.force_close()
    return resp


# --------------------------------------------------------------------------------- native
async def generate(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    ctype = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if ctype not in MSGPACK_TYPES:
        shown = ascii(ctype) if ctype else "no Content-Type"  # header bytes need not be text
        raise ProtocolError(415, f"the body must be msgpack (Content-Type: {MSGPACK_TYPE}), got {shown}",
                            "unsupported_media_type")
    req = parse_native(decode_msgpack(await read_body(request)))
    p = await prepare(service, req)
    stream = service.submit(p)
    async with stream:
        # The status line waits for the first output: a request refused in the queue (or one
        # that times out there) still gets its own status, not a 200 with an error frame.
        o = await anext(stream)
        if o.finished and o.error:
            raise output_error(o)
        if not req.stream:
            text, ids = [o.text], list(o.token_ids)
            while not o.finished:
                o = await anext(stream)
                text.append(o.text)
                ids += o.token_ids
            return web.Response(body=msgpack.packb(_native_whole(p, o, "".join(text), ids)),
                                content_type=MSGPACK_TYPE, status=500 if o.error else 200)
        resp = web.StreamResponse(headers={"Content-Type": NATIVE_STREAM_TYPE, "Cache-Control": "no-cache"})
        await resp.prepare(request)
        frames = [native_start(p.request_id, len(p.prompt_ids), o.cached_tokens)]
        try:
            while True:
                if o.token_ids or o.text:
                    frames.append(native_delta(o.text, o.token_ids, o.logprobs))
                if o.finished:
                    frames.append(_native_final(o))
                if not await send(request, resp, b"".join(msgpack.packb(f) for f in frames)):
                    return resp  # the client stopped reading: dropped (leaving `with` aborts)
                if o.finished:
                    break
                frames = []
                o = await anext(stream)
        except ProtocolError as e:  # e.g. the request timed out mid-stream
            if not await send(request, resp, msgpack.packb(native_error(e.status, e.message))):
                return resp
        await finish(request, resp)
        return resp


def _native_final(o: Any) -> dict[str, Any]:
    if o.error:
        return native_error(500, o.error)
    u, t = o.usage, o.timing
    return native_end(
        (o.finish_reason or FinishReason.ABORT).value,
        {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "cached_tokens": u.cached_tokens},
        {"queue_ms": round(t.queue_ms, 3), "ttft_ms": round(t.ttft_ms, 3), "tpot_ms": round(t.tpot_ms, 3)},
    )


def _native_whole(p: Prepared, o: Any, text: str, ids: list[int]) -> dict[str, Any]:
    final = _native_final(o)
    if final["type"] == "error":
        return error_body("engine_error", final["message"])
    return {"id": p.request_id, "text": text, "token_ids": ids, "finish_reason": final["finish_reason"],
            "usage": final["usage"], "timing": final["timing"]}


# --------------------------------------------------------------------------------- misc
async def health(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if service.state == "ready":
        return web.json_response({"status": "ok"})
    return web.json_response({"status": service.state}, status=503, headers={"Retry-After": "5"})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVICE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": METRICS_TYPE})


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].status())


async def reload(request: web.Request) -> web.Response:
    result = request.app[RELOAD]()
    return web.json_response(result.to_dict(), status=200 if result.ok else 400)


async def tokenize(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    obj = await read_json(request)
    if not isinstance(obj, dict):
        raise ProtocolError(400, "the body must be a JSON object {text}")
    text = obj.get("text", obj.get("prompt"))
    if not isinstance(text, str):
        raise ProtocolError(400, f"text: must be a string (got {text!r:.60})", param="text")
    special = obj.get("add_special_tokens", False)
    if not isinstance(special, bool):
        raise ProtocolError(400, "add_special_tokens: must be true or false", param="add_special_tokens")
    loop = asyncio.get_running_loop()
    ids = await loop.run_in_executor(None, lambda: service.llm.tokenizer.encode(text, add_special_tokens=special))
    limit = service.engine.scheduler.next_limits.max_model_len
    return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": limit})


async def detokenize(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    obj = await read_json(request)
    tokens = obj.get("tokens") if isinstance(obj, dict) else None
    tok = service.llm.tokenizer
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ProtocolError(400, "tokens: must be a list of integer token ids", param="tokens")
    bad = [t for t in tokens if not 0 <= t < tok.vocab_size]
    if bad:
        raise ProtocolError(400, f"tokens: ids {bad[:5]} are outside the vocabulary (size {tok.vocab_size})",
                            param="tokens")
    return web.json_response({"text": tok.decode(tokens)})


def _too_many_connections() -> bytes:
    body = json.dumps(error_body("server_overloaded", "too many open connections (limits.max_connections)")).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Retry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def limit_connections(server: web.Server, limit: Callable[[], int]) -> None:
    """Refuse connections beyond `limit()` (read live: limits.max_connections reloads) with a
    503 and close them at once, before they can send anything: every open connection holds a
    file descriptor and a handler task, idle or not. aiohttp has no such cap; its Server tells
    us of each connection through `connection_made`, which is wrapped here."""
    made = server.connection_made
    refusal = _too_many_connections()

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        made(handler, transport)
        if len(server.connections) > limit():
            log.warning("refused a connection: %d open (limits.max_connections = %d)",
                        len(server.connections) - 1, limit())
            transport.write(refusal)
            transport.close()

    server.connection_made = connection_made  # type: ignore[method-assign]


def build_app(service: Service, allow: AllowList, reload_fn: Callable[[], ReloadResult]) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=1 << 40)  # bodies are bounded by read_body
    app[SERVICE] = service
    app[ALLOW] = allow
    app[RELOAD] = reload_fn
    app.router.add_post("/v1/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/status", status)
    app.router.add_post("/v1/reload", reload)
    app.router.add_post("/v1/tokenize", tokenize)
    app.router.add_post("/v1/detokenize", detokenize)
    openai_routes.add_routes(app)
    return app
