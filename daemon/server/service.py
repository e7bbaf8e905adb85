"""What the HTTP layer talks to: the loaded model and its engine (imported once the socket
answers: torch takes seconds), the config in force and its reloads, request intake (tokenize,
check, submit; each request's outputs then flow through a `streams.RequestStream`), and the
daemon's status.
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
from ..engine.sampling_params import SamplingParamsError
from ..engine.scheduler_config import QueueFullError, RequestLimits, RequestTooLongError
from ..engine.sequence import FinishReason
from ..runtime.settings import cpu_settings
from .config import Config, ConfigError, load_config, parse_memory
from .metrics import Metrics
from .protocol import ProtocolError
from .requests import GenerateRequest
from .streams import Prepared, RequestStream

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


def request_limits(c: Config, model_max_len: int) -> RequestLimits:
    """What the engine enforces per request, from the `limits` section (the context capped by
    the model's own)."""
    return RequestLimits(max_model_len=min(c.limits.max_model_len, model_max_len),
                         queue_timeout_s=c.limits.queue_timeout_s)


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
            scheduler=c.scheduler,
            max_model_len=c.limits.max_model_len,
            queue_timeout_s=c.limits.queue_timeout_s,
            cpu=cpu_settings(c.runtime),
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
                limits = None
                if self.llm is not None:
                    limits = request_limits(merged, self.llm.model.config.max_position)
                    limits.check(merged.scheduler)
            except (ConfigError, ValueError) as e:
                result = ReloadResult(False, now, self.config_path, str(e))
            except Exception as e:  # a bug, not the file: still nothing applied, and reported
                log.exception("reload failed")
                result = ReloadResult(False, now, self.config_path, f"internal error: {e!r}")
            else:
                live, restart = self.config.diff(new)
                self.config = merged
                if limits is not None:
                    self.engine.update_config(merged.scheduler, limits)
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
        limit = self.engine.scheduler.next_limits.max_model_len
        if len(ids) >= limit:
            raise ProtocolError(
                400, f"the prompt has {len(ids)} tokens, the context holds {limit}: no room to generate",
                param="prompt",
            )
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = min(self.config.limits.default_max_tokens, limit - len(ids))
        try:
            params = replace(req.params, max_tokens=max_tokens)
            params.check_vocab(tok.vocab_size)  # add_request checks again; this names the field early
        except SamplingParamsError as e:
            raise ProtocolError(400, str(e), param=str(e).split(":", 1)[0]) from None
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
            o.finish_reason or FinishReason.ABORT, o.usage.prompt_tokens, o.usage.completion_tokens, o.timing.ttft_ms,
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
            max_model_len=s.limits.max_model_len,
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
