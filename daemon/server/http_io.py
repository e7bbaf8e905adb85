"""Shared by the HTTP route modules: the app's typed state keys, bounded body reading (size and
time), writes that give up on a client that stops reading, and request preparation off the
event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .protocol import ProtocolError
from .requests import GenerateRequest, decode_json
from .service import ReloadResult, Service
from .sockets import AllowList
from .streams import Prepared

if TYPE_CHECKING:
    from ..engine.outputs import EngineOutput

log = logging.getLogger(__name__)

SERVICE = web.AppKey("service", Service)
ALLOW = web.AppKey("allow", AllowList)
ReloadFn = Callable[[], ReloadResult]
RELOAD: web.AppKey[ReloadFn] = web.AppKey("reload")


async def read_body(request: web.Request) -> bytes:
    """The whole body, refusing (413) beyond `limits.max_body_bytes` whatever Content-Length
    says, and (408) when it has not all arrived within `limits.read_timeout_s`: a client that
    trickles a body, or announces more than it sends, does not hold a connection for long."""
    limits = request.app[SERVICE].config.limits
    limit = limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ProtocolError(413, f"body of {request.content_length} bytes is over limits.max_body_bytes ({limit})",
                            "request_too_large")
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(413, f"body is over limits.max_body_bytes ({limit})", "request_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), limits.read_timeout_s)
    except asyncio.TimeoutError:
        raise ProtocolError(
            408, f"the request body did not arrive within {limits.read_timeout_s:g} s (limits.read_timeout_s)",
            "request_timeout",
        ) from None
    return b"".join(chunks)


async def read_json(request: web.Request) -> Any:
    return decode_json(await read_body(request))


async def send(request: web.Request, resp: web.StreamResponse, data: bytes) -> bool:
    """Write part of a streamed response. False when the client is gone, or took none of it
    within `limits.write_timeout_s` (the connection is then cut: its buffer would never drain);
    the caller then ends the request, which frees its KV blocks."""
    timeout = request.app[SERVICE].config.limits.write_timeout_s
    try:
        await asyncio.wait_for(resp.write(data), timeout)
        return True
    except ConnectionResetError:  # the client left between two writes (aiohttp's ClientConnectionResetError)
        return False
    except asyncio.TimeoutError:
        log.warning("client of %s read nothing for %g s (limits.write_timeout_s): dropped", request.path, timeout)
        if request.transport is not None:
            request.transport.abort()
        return False


async def finish(request: web.Request, resp: web.StreamResponse) -> None:
    """End a streamed response, with the same patience for the client as `send`."""
    timeout = request.app[SERVICE].config.limits.write_timeout_s
    try:
        await asyncio.wait_for(resp.write_eof(), timeout)
    except ConnectionResetError:
        pass  # the client left after the last output: nothing is owed to it
    except asyncio.TimeoutError:
        if request.transport is not None:
            request.transport.abort()


def output_error(o: EngineOutput) -> ProtocolError:
    """The error an engine output that ends a request with `error` stands for."""
    assert o.error is not None
    if o.overloaded:
        err = ProtocolError(503, o.error, "server_overloaded")
        err.headers["Retry-After"] = "1"
        return err
    return ProtocolError(500, o.error, "engine_error")


async def prepare(service: Service, req: GenerateRequest) -> Prepared:
    # Tokenizing a long prompt is milliseconds of pure Python: off the event loop.
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, service.prepare, req)
