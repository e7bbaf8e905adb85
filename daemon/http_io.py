"""Shared by the HTTP route modules: the app's typed state keys, bounded body reading, and
request preparation off the event loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .protocol import GenerateRequest, ProtocolError
from .service import Prepared, ReloadResult, Service
from .sockets import AllowList

SERVICE = web.AppKey("service", Service)
ALLOW = web.AppKey("allow", AllowList)
ReloadFn = Callable[[], ReloadResult]
RELOAD: web.AppKey[ReloadFn] = web.AppKey("reload")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing (413) beyond `limit` bytes whatever Content-Length says."""
    if request.content_length is not None and request.content_length > limit:
        raise ProtocolError(413, f"body of {request.content_length} bytes is over limits.max_body_bytes ({limit})",
                            "request_too_large")
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(413, f"body is over limits.max_body_bytes ({limit})", "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: web.Request) -> Any:
    body = await read_body(request, request.app[SERVICE].config.limits.max_body_bytes)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(400, f"the body is not valid JSON: {e}") from None


async def prepare(service: Service, req: GenerateRequest) -> Prepared:
    # Tokenizing a long prompt is milliseconds of pure Python: off the event loop.
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, service.prepare, req)
