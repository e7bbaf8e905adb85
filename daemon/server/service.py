"""What the HTTP layer talks to: the loaded model and its engine, the config in force and its
reloads, request intake (tokenize, check, submit) and the asyncio side of each request's
stream.

The engine calls each request's sink on its own thread; the sink hands the output to the
event loop with `call_soon_threadsafe`, so a request's coroutine sleeps on an asyncio queue
until its next token exists (no polling). Leaving the stream early — a client disconnect
cancels the handler, a timeout, an exception — aborts the request in the engine, whose blocks
are free by the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..engine.outputs import EngineOutput, EngineSnapshot
from ..engine.sampling_params import SamplingParams, SamplingParamsError
from ..engine.scheduler import QueueFullError, RequestTooLongError, SchedulerConfig
from .config import Config, ConfigError, load_config, parse_memory
from .metrics import Metrics
from .protocol import GenerateRequest, ProtocolError

log = logging.getLogger(__name__)

State = Literal["loading", "ready", "draining", "failed"]


@dataclass
class ReloadResult:
    ok: bool
    time: float  # wall clock
    source: str | None
    error: str | None = None
    live_changed: tuple[str, ...] = ()
    restart_required: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "time": self.time,
            "file": self.source,
            "error": self.error,
            "applied": list(self.live_changed),
            "restart_required": list(self.restart_required),
        }


@dataclass
class Prepared:
    """A request ready for the engine."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int
    created: int  # wall-clock seconds, for OpenAI's `created`
    arrival: float  # monotonic


def scheduler_config(c: Config, max_model_len: int | None = None) -> SchedulerConfig:
    s = c.scheduler
    return SchedulerConfig(
        max_num_seqs=s.max_num_seqs,
        max_num_batched_tokens=s.max_num_batched_tokens,
        max_queue_delay_ms=s.max_queue_delay_ms,
        max_waiting=s.max_waiting,
        chunked_prefill=s.chunked_prefill,
        policy=s.policy,
        kv_policy=s.kv_policy,
        max_model_len=min(c.limits.max_model_len, max_model_len or c.limits.max_model_len),
        queue_timeout_s=c.limits.queue_timeout_s,
    )


def kv_memory(value: str | int) -> int | float | str:
    """kv_cache.memory as `plan_num_blocks` takes it: "auto", bytes, or a share."""
    return value if value == "auto" or isinstance(value, int) else parse_memory(value)


class Service:
    def __init__(
        self, config: Config, *, model: str | None = None, device: str | None = None, dtype: str | None = None
    ) -> None:
        # Command-line overrides of the file's model section, applied again to every reloaded
        # file: the running model must not show as "changed, restart required".
        self._overrides = {k: v for k, v in (("path", model), ("device", device), ("dtype", dtype)) if v}
        config = self._with_overrides(config)
        self.config = config
        self.config_path = config.source
        self.state: State = "loading"
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.ready_after_s: float | None = None
        self.llm: Any = None  # inflightd.llm.LLM once loaded (imported late: torch takes seconds)
        self.model_name = ""
        self.last_reload: ReloadResult | None = None
        self.metrics = Metrics(self.snapshot)
        self._ids = itertools.count()
        self._recent: deque[tuple[float, int]] = deque()  # (monotonic, tokens) of the last minute
        self.loop: asyncio.AbstractEventLoop | None = None
        self.streams: dict[str, RequestStream] = {}  # in flight, for drain
        self._drained: asyncio.Event | None = None

    def _with_overrides(self, config: Config) -> Config:
        return replace(config, model=replace(config.model, **self._overrides)) if self._overrides else config  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------ loading
    def load(self) -> None:
        """Blocking (run it in a thread): load the model, compile the kernels, start the engine."""
        from ..llm import LLM  # torch and numba: seconds to import

        c = self.config
        t0 = time.monotonic()
        self.llm = LLM(
            model=c.model.path,
            device=c.model.device,
            dtype=c.model.dtype,
            block_size=c.kv_cache.block_size,
            kv_cache_memory=kv_memory(c.kv_cache.memory),
            prefix_caching=c.kv_cache.prefix_caching,
            scheduler_config=scheduler_config(c),
        )
        self.model_name = self.llm.model_path.stem if self.llm.model_path.is_file() else self.llm.model_path.name
        log.info("model %s ready in %.1f s", self.model_name, time.monotonic() - t0)

    def mark_ready(self) -> None:
        self.state = "ready"
        self.ready_after_s = time.monotonic() - self.started_mono

    @property
    def engine(self) -> Any:
        return self.llm.engine

    def snapshot(self) -> EngineSnapshot | None:
        return None if self.llm is None else self.llm.engine.snapshot()

    # ------------------------------------------------------------------------------- reload
    def reload(self) -> ReloadResult:
        """Re-read the config file. Live keys go to the engine (applied at its next step);
        restart-only keys are reported and keep their running values; an invalid file changes
        nothing."""
        now = time.time()
        if self.config_path is None:
            result = ReloadResult(False, now, None, "no config file was given (--config): nothing to reload")
        else:
            # One transaction: everything that can fail is computed from the new file first;
            # only then is anything applied.
            try:
                new = self._with_overrides(load_config(self.config_path))
                merged = self.config.with_live_from(new)
                sched = None
                if self.llm is not None:
                    sched = scheduler_config(merged, self.llm.model.config.max_position)
            except (ConfigError, ValueError) as e:
                result = ReloadResult(False, now, self.config_path, str(e))
            except Exception as e:  # a bug, not the file: still nothing applied, and reported
                log.exception("reload failed")
                result = ReloadResult(False, now, self.config_path, f"internal error: {e!r}")
            else:
                live, restart = self.config.diff(new)
                self.config = merged
                if sched is not None:
                    self.engine.update_config(sched)
                logging.getLogger("inflightd").setLevel(merged.log.level.upper())
                result = ReloadResult(True, now, self.config_path, None, tuple(live), tuple(restart))
        self.last_reload = result
        if result.ok:
            log.info("reloaded %s: applied %s%s", result.source, ", ".join(result.live_changed) or "nothing",
                     f"; needs a restart: {', '.join(result.restart_required)}" if result.restart_required else "")
        else:
            log.error("reload failed, the previous config stays in force: %s", result.error)
        return result

    # ------------------------------------------------------------------------------ intake
    def prepare(self, req: GenerateRequest) -> Prepared:
        """Tokenize and check a request (CPU work: call it off the event loop for long
        prompts). Raises ProtocolError."""
        llm = self.llm
        tok = llm.tokenizer
        if req.messages is not None:
            if llm.chat_template is None:
                raise ProtocolError(400, f"model {self.model_name} has no chat template: send a prompt instead")
            try:
                text = llm.chat_template.render(req.messages, add_generation_prompt=True)
            except ValueError as e:
                raise ProtocolError(400, f"messages: {e}", param="messages") from None
            ids = tok.encode(text, add_special_tokens=False)
        elif isinstance(req.prompt, str):
            ids = tok.encode(req.prompt, add_special_tokens=True)
        else:
            assert req.prompt is not None
            ids = list(req.prompt)
            bad = [t for t in ids if t >= tok.vocab_size]
            if bad:
                raise ProtocolError(400, f"prompt: token ids {bad[:5]} are outside the vocabulary (size "
                                    f"{tok.vocab_size})", param="prompt")
        limit = self.engine.scheduler.config.max_model_len
        if len(ids) >= limit:
            raise ProtocolError(
                400, f"the prompt has {len(ids)} tokens, the context holds {limit}: no room to generate",
                param="prompt",
            )
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = min(self.config.limits.default_max_tokens, limit - len(ids))
        try:
            params = SamplingParams(max_tokens=max_tokens, **req.sampling)
            params.check_vocab(tok.vocab_size)  # add_request checks again; this names the field early
        except SamplingParamsError as e:
            raise ProtocolError(400, str(e), param=str(e).split(":", 1)[0]) from None
        except TypeError as e:  # a key SamplingParams does not take: a bug in protocol.py
            raise ProtocolError(500, f"internal: {e}") from None
        rid = f"{next(self._ids):x}-{os.urandom(4).hex()}"
        return Prepared(rid, ids, params, req.priority, int(time.time()), time.monotonic())

    def submit(self, p: Prepared) -> RequestStream:
        """Queue the request and return its stream of outputs. Raises ProtocolError (nothing
        queued) when the engine refuses it."""
        if self.state != "ready":
            raise ProtocolError(503, f"the daemon is {self.state}", "service_unavailable")
        loop = self.loop or asyncio.get_running_loop()
        stream = RequestStream(self, p, loop)
        try:
            self.engine.add_request(p.request_id, p.prompt_ids, p.params, stream.sink, priority=p.priority)
        except QueueFullError as e:
            self.metrics.rejected.labels("503").inc()
            err = ProtocolError(503, str(e), "server_overloaded")
            err.headers["Retry-After"] = "1"
            raise err from None
        except RequestTooLongError as e:
            self.metrics.rejected.labels("400").inc()
            raise ProtocolError(400, str(e), param="max_tokens") from None
        except SamplingParamsError as e:
            self.metrics.rejected.labels("400").inc()
            raise ProtocolError(400, str(e), param=str(e).split(":", 1)[0]) from None
        except ValueError as e:
            self.metrics.rejected.labels("400").inc()
            raise ProtocolError(400, str(e)) from None
        except RuntimeError as e:  # failed or shutting down
            raise ProtocolError(503, str(e), "service_unavailable") from None
        stream.arm_timeout(self.config.limits.request_timeout_s)
        self.streams[p.request_id] = stream
        return stream

    def _stream_done(self, request_id: str) -> None:
        self.streams.pop(request_id, None)
        if not self.streams and self._drained is not None:
            self._drained.set()

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until no request is in flight (True) or `timeout` passes (False)."""
        if not self.streams:
            return True
        self._drained = asyncio.Event()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def abort_all(self) -> int:
        """Abort every request in flight: each stream gets its terminal "abort" output."""
        ids = list(self.streams)
        for rid in ids:
            self.engine.abort(rid)
        return len(ids)

    def _count(self, n: int) -> None:
        now = time.monotonic()
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - 60:
            self._recent.popleft()

    def _observe(self, o: EngineOutput, p: Prepared) -> None:
        if o.usage is None or o.timing is None:
            return
        self.metrics.observe_end(
            o.finish_reason or "abort", o.usage.prompt_tokens, o.usage.completion_tokens, o.timing.ttft_ms,
            o.timing.tpot_ms, o.timing.queue_ms, time.monotonic() - p.arrival,
        )

    # ------------------------------------------------------------------------------ status
    def tokens_per_s(self, window: float = 10.0) -> float:
        """Output tokens per second over the last `window` seconds."""
        now = time.monotonic()
        n = sum(k for t, k in self._recent if t >= now - window)
        return n / window

    def status(self) -> dict[str, Any]:
        c = self.config
        out: dict[str, Any] = {
            "state": self.state,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_mono, 3),
            "ready_after_s": self.ready_after_s,
            "model": self.model_name or c.model.path,
            "config_file": self.config_path,
            "config": c.to_dict(),
            "last_reload": None if self.last_reload is None else self.last_reload.to_dict(),
        }
        llm = self.llm
        if llm is None:
            return out
        s = llm.engine.snapshot()
        tps = self.tokens_per_s()
        used = s.num_blocks - s.num_free_blocks
        out.update(
            device=str(llm.model.device),
            dtype=str(llm.model.dtype).removeprefix("torch."),
            max_model_len=s.config.max_model_len,
            scheduler_in_force={
                "max_queue_delay_ms": s.config.max_queue_delay_ms,
                "max_num_seqs": s.config.max_num_seqs,
                "max_num_batched_tokens": s.config.max_num_batched_tokens,
                "max_waiting": s.config.max_waiting,
                "policy": s.config.policy,
            },
            queue_depth=s.num_waiting,
            running=s.num_running,
            kv_blocks_used=used,
            kv_blocks_total=s.num_blocks,
            kv_block_size=llm.block_manager.block_size,
            prefix_hit_rate=(s.prefix_hit_tokens / s.prefix_query_tokens) if s.prefix_query_tokens else 0.0,
            preemptions=s.num_preemptions,
            tokens_per_s=round(tps, 2),
            usd_per_million_tokens=(
                round(c.cost.usd_per_hour / 3600 / tps * 1e6, 4) if tps > 0 and c.cost.usd_per_hour > 0 else None
            ),
            tokens_per_joule=(round(tps / c.cost.watts, 4) if tps > 0 and c.cost.watts > 0 else None),
            engine_error=None if llm.engine.error is None else str(llm.engine.error),
        )
        return out

    def status_line(self) -> str:
        """One line for systemd's STATUS=."""
        if self.llm is None:
            return f"{self.state}: loading {self.config.model.path}"
        s = self.llm.engine.snapshot()
        r = self.last_reload
        bad = "" if r is None or r.ok else f"; last reload failed: {r.error}"
        return (
            f"{self.state}: {s.num_running} running, {s.num_waiting} waiting, "
            f"{self.tokens_per_s():.1f} tok/s, KV {s.num_blocks - s.num_free_blocks}/{s.num_blocks}{bad}"
        )


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
