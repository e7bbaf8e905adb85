"""Each request's outputs on the asyncio side: the engine thread hands them over with
`call_soon_threadsafe`, and the request's handler awaits them in order (no polling). Leaving the
stream early — a client disconnect cancels the handler, a timeout, an exception — aborts the
request in the engine, whose blocks are free by the next step.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..engine.outputs import EngineOutput
from ..engine.sampling_params import SamplingParams
from .protocol import ProtocolError

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A request ready for the engine."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int
    created: int  # wall-clock seconds, for OpenAI's `created`
    arrival: float  # monotonic


# Outputs a stream may hold that its handler has not taken (it is stuck writing to a client that
# does not read). Beyond it the request is aborted: a stalled client must not pin KV blocks and
# memory until max_tokens. limits.write_timeout_s usually drops such a client first.
MAX_BACKLOG = 4096


class RequestStream:
    """One request's outputs, in order, the last with `finished`. `async for` it; `aclose()`
    (or leaving an `async with`) before the end aborts the request in the engine.

    The server may drop a stream on its own: at `limits.request_timeout_s` (504), or when its
    backlog passes MAX_BACKLOG (503). The request is then aborted in the engine at once,
    whatever its handler is doing (a handler blocked writing to a client that stopped reading
    cannot be relied on to notice), and the handler's next read raises the error."""

    def __init__(self, service: Service, p: Prepared, loop: asyncio.AbstractEventLoop) -> None:
        self._service = service
        self._p = p
        self._loop = loop
        # None wakes a reader after a drop. One timer per request (armed once the engine took
        # it), not a timeout per awaited token.
        self._queue: asyncio.Queue[EngineOutput | None] = asyncio.Queue()
        self._timer: asyncio.TimerHandle | None = None
        self._error: ProtocolError | None = None  # why the server dropped it, until raised
        self.finished = False  # the terminal output was taken, or the request was aborted
        self.completion_tokens = 0

    def arm_timeout(self, seconds: float) -> None:
        self._timer = self._loop.call_later(
            seconds, self._drop, ProtocolError(
                504, f"request timed out after {seconds:g} s (limits.request_timeout_s)", "timeout"
            ),
        )

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def sink(self, o: EngineOutput) -> None:  # on the engine thread; must not block
        self._loop.call_soon_threadsafe(self._put, o)

    def _put(self, o: EngineOutput) -> None:
        if self.finished:
            return  # aborted here: the engine's own terminal output goes unread
        self._queue.put_nowait(o)
        if self._queue.qsize() > MAX_BACKLOG:
            self._drop(ProtocolError(
                503, f"the client took no output while {MAX_BACKLOG} outputs waited: request aborted",
                "client_too_slow",
            ))

    def _drop(self, error: ProtocolError) -> None:
        if self.finished:
            return
        log.warning("request %s dropped: %s", self._p.request_id, error.message)
        self._abort()
        self._error = error
        self._queue.put_nowait(None)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> EngineOutput:
        o = None
        if self._error is None:
            if self.finished:
                raise StopAsyncIteration
            o = await self._queue.get()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        assert o is not None
        if o.token_ids:
            self.completion_tokens += len(o.token_ids)
            self._service._count(len(o.token_ids))
        if o.finished:
            self.finished = True
            self._disarm()
            if o.overloaded:
                self._service.metrics.rejected.labels("503").inc()
            else:
                self._service._observe(o, self._p)
            self._service._stream_done(self._p.request_id)
        return o

    def _abort(self) -> None:
        # The engine's own terminal output will go unread, so the abort is counted here.
        self.finished = True
        self._disarm()
        self._service.engine.abort(self._p.request_id)
        self._service._stream_done(self._p.request_id)
        self._service.metrics.observe_abort(len(self._p.prompt_ids), self.completion_tokens)

    async def aclose(self) -> None:
        if not self.finished:  # the client left, or the handler gave up on it
            self._abort()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
