"""`inflightd serve`: the daemon's lifecycle.

    bind (or inherit) sockets → serve /health (503 "loading") → load the model and compile every
    kernel in a thread → READY=1 → serve … → SIGTERM: STOPPING=1, stop accepting, drain → exit 0

Sockets are bound first, in the main thread, before anything starts a thread (the umask that
gives the socket its mode is per process), and before the model loads, so that clients see
"loading" instead of "no daemon". SIGHUP (and POST /v1/reload) re-reads the config: RELOADING=1
with MONOTONIC_USEC, then READY=1, whether or not the file was valid (systemd waits for it).
WATCHDOG=1 is sent only while the engine is idle or its step loop advances; a failed engine
step (e.g. a poisoned CUDA context) fails what is in flight and exits 1 so that systemd
restarts the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiohttp import web

from ..runtime.settings import apply_omp_environment, cpu_settings
from . import systemd
from .app import build_app, limit_connections
from .config import Config, ConfigError, default_socket_path, load_config, parse_tcp
from .service import ReloadResult, Service
from .sockets import AllowList, SocketInUseError, bind_tcp, bind_unix, file_identity, unlink_if_ours

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 10.0  # STATUS= refresh without a watchdog (a timer, not a busy loop)


@dataclass
class Listeners:
    unix: list[socket.socket] = field(default_factory=list)
    tcp: list[socket.socket] = field(default_factory=list)
    owned_path: str | None = None  # a socket file we bound (and remove at exit)
    identity: tuple[int, int] | None = None
    path: str | None = None  # the Unix socket's path, owned or inherited

    @property
    def all(self) -> list[socket.socket]:
        return self.unix + self.tcp


def open_listeners(config: Config, socket_path: str | None) -> Listeners:
    """Inherited sockets (socket activation) when there are any, else our own bind."""
    out = Listeners()
    for s in systemd.listen_fds():
        s.setblocking(False)
        if s.family == socket.AF_UNIX:
            out.unix.append(s)
            name = s.getsockname()
            out.path = name if isinstance(name, str) and name else out.path
        else:
            out.tcp.append(s)
    if out.unix or out.tcp:
        log.info("socket activation: %d inherited socket(s)", len(out.all))
    else:
        path = socket_path or config.listen.unix_socket or default_socket_path()
        out.unix.append(bind_unix(path, int(config.listen.socket_mode, 8)))
        out.owned_path = out.path = path
        out.identity = file_identity(path)
        if config.listen.tcp is not None:
            out.tcp.append(bind_tcp(*parse_tcp(config.listen.tcp)))
    return out


class Daemon:
    def __init__(self, service: Service, listeners: Listeners, notifier: systemd.Notifier) -> None:
        self.service = service
        self.listeners = listeners
        self.notifier = notifier
        self._stop = asyncio.Event()
        self._fatal: BaseException | None = None

    def reload(self) -> ReloadResult:
        """SIGHUP / POST /v1/reload, on the event loop."""
        self.notifier.reloading()
        try:
            result = self.service.reload()
        finally:
            status = self.service.status_line()
            self.notifier.ready(status)
        return result

    async def _wait_stop(self) -> None:
        await self._stop.wait()

    def _on_engine_error(self, exc: BaseException) -> None:  # on the loop, via call_soon_threadsafe
        log.critical("engine failed, exiting: %s", exc)
        self._fatal = exc
        self._stop.set()

    async def _watchdog(self, interval: float, ping: bool) -> None:
        """Every `interval`: STATUS= with the load and, with `ping`, WATCHDOG=1 while healthy:
        idle, or a step finished within the last two intervals."""
        engine = self.service.engine
        while True:
            await asyncio.sleep(interval)
            idle = engine.num_unfinished == 0
            fresh = time.monotonic() - engine.last_progress < 2 * interval
            if not ping:
                self.notifier.status(self.service.status_line())
            elif engine.error is None and (idle or fresh):
                self.notifier.watchdog()
                self.notifier.status(self.service.status_line())
            else:
                log.error("engine made no progress for %.0f s: withholding the watchdog ping",
                          time.monotonic() - engine.last_progress)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        service = self.service
        service.loop = loop
        c = service.config
        allow = AllowList.build(self.listeners.path, c.listen.allow_uids, c.listen.allow_groups)
        app = build_app(service, allow, self.reload)
        # keepalive_timeout also bounds how long a connection may take to send a request's head
        # (aiohttp arms it at connect): idle and slowloris connections close after it. After an
        # answer given before the body was read (408, 413) aiohttp reads and drops the rest so
        # that the client sees the answer; for at most a second (its default, 10 s, would let a
        # trickled body hold the connection that long).
        runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True, access_log=None,
                               shutdown_timeout=5.0, keepalive_timeout=c.limits.keepalive_timeout_s,
                               lingering_time=1.0)
        await runner.setup()
        assert runner.server is not None
        limit_connections(runner.server, lambda: service.config.limits.max_connections)
        sites = [web.SockSite(runner, s) for s in self.listeners.all]
        for site in sites:
            await site.start()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        where = ", ".join(str(s.getsockname()) for s in self.listeners.all)
        log.info("listening on %s; loading %s", where, c.model.path)
        self.notifier.status(f"loading {c.model.path}")
        watchdog: asyncio.Task[None] | None = None
        load: asyncio.Future[None] = loop.run_in_executor(None, service.load)
        stop_wait: asyncio.Future[None] = asyncio.ensure_future(self._wait_stop())
        try:
            done, _ = await asyncio.wait([load, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            if load not in done:  # SIGTERM while loading: nothing is in flight
                log.info("stopped while loading")
                self.notifier.stopping()
                return 0
            try:
                load.result()
            except Exception as e:
                log.critical("cannot start: %s", e, exc_info=not isinstance(e, (ValueError, OSError)))
                service.state = "failed"
                self.notifier.status(f"failed to load the model: {e}")
                return 1
            service.engine.on_error = lambda exc: loop.call_soon_threadsafe(self._on_engine_error, exc)
            service.mark_ready()
            log.info("ready after %.2f s: %s", service.ready_after_s, service.status_line())
            self.notifier.ready(service.status_line())
            interval = self.notifier.watchdog_interval()
            if interval is not None:
                watchdog = asyncio.create_task(self._watchdog(interval, ping=True))
            elif self.notifier.enabled:  # no watchdog: still keep `systemctl status` current
                watchdog = asyncio.create_task(self._watchdog(STATUS_INTERVAL_S, ping=False))
            await stop_wait
            return await self._shutdown(sites)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            stop_wait.cancel()
            await runner.cleanup()
            if service.llm is not None:
                service.engine.shutdown(timeout=10)
            if self.listeners.owned_path is not None:
                unlink_if_ours(self.listeners.owned_path, self.listeners.identity)
            self.notifier.close()

    async def _shutdown(self, sites: Sequence[web.BaseSite]) -> int:
        service = self.service
        if self._fatal is not None:
            self.notifier.stopping(f"engine failed: {self._fatal}")
            service.state = "failed"
            await service.wait_drained(2.0)  # the engine has sent each request its terminal output
            return 1
        timeout = service.config.limits.drain_timeout_s
        n = len(service.streams)
        self.notifier.stopping(f"draining {n} request(s), up to {timeout:g} s")
        log.info("stopping: draining %d request(s) for up to %g s", n, timeout)
        service.state = "draining"
        for site in sites:  # stop accepting; open connections get 503
            await site.stop()
        if not await service.wait_drained(timeout):
            log.warning("drain timeout: aborting %d request(s)", service.abort_all())
            await service.wait_drained(5.0)
        return 0


def _raise_fd_limit(max_connections: int) -> None:
    """Each connection is a file descriptor: lift the soft limit (often 1024) towards the hard
    one so that limits.max_connections, not EMFILE, is what refuses a connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + 256  # model files, the notify socket, Numba's cache, logs
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def main(config_path: str | None, socket_path: str | None, model: str | None, device: str | None,
         dtype: str | None = None) -> int:
    if config_path is not None:
        config_path = os.path.abspath(config_path)  # reloads must find it whatever the cwd becomes
    try:
        config = load_config(config_path)
        # before anything loads torch: libgomp reads these once
        apply_omp_environment(cpu_settings(config.runtime))
    except (ConfigError, ValueError) as e:
        print(f"inflightd serve: {e}", file=sys.stderr)
        return 2
    logging.getLogger("inflightd").setLevel(config.log.level.upper())
    _raise_fd_limit(config.limits.max_connections)
    notifier = systemd.Notifier()
    try:
        listeners = open_listeners(config, socket_path)
    except (SocketInUseError, OSError) as e:
        print(f"inflightd serve: {e}", file=sys.stderr)
        notifier.status(f"cannot listen: {e}")
        return 1
    service = Service(config, model=model, device=device, dtype=dtype)
    import uvloop

    return uvloop.run(Daemon(service, listeners, notifier).run())
