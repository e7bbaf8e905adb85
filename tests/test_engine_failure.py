"""A failed engine step (what a poisoned CUDA context looks like from Python) fails every
request in flight with a terminal error frame and ends the daemon with exit status 1, so that
systemd restarts it instead of it serving errors for hours.

Runs the daemon in-process (the real Service, engine, model and server) so that the fault can
be injected into the model runner after start-up."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop
from daemon_util import TEST_CONFIG, Daemon, NotifyListener

from inflightd.server import systemd
from inflightd.server.config import parse_config
from inflightd.server.daemon import Daemon as ServeDaemon
from inflightd.server.daemon import open_listeners
from inflightd.server.service import Service

pytestmark = pytest.mark.slow


def test_engine_failure_fails_requests_and_exits_nonzero(tmp_path: Path, default_gguf: Path) -> None:
    sock = str(tmp_path / "d.sock")
    config = parse_config(TEST_CONFIG, source=str(tmp_path / "c.yaml"))
    notify = NotifyListener(tmp_path / "notify.sock")
    notifier = systemd.Notifier({"NOTIFY_SOCKET": notify.path})
    service = Service(config)
    daemon = ServeDaemon(service, open_listeners(config, sock), notifier)
    client = Daemon(None, sock, tmp_path / "c.yaml", tmp_path / "log", notify)  # type: ignore[arg-type]
    frames: list[dict[str, Any]] = []

    def client_side() -> None:
        notify.wait_for("READY", "1")
        runner = service.engine.runner
        real = runner.execute
        calls = {"n": 0}

        def failing(*args: Any) -> Any:
            calls["n"] += 1
            if calls["n"] > 3:  # a few tokens stream first
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real(*args)

        runner.execute = failing
        frames.extend(client.stream_native({"prompt": "Once upon a time", "max_tokens": 50, "ignore_eos": True}))

    t = threading.Thread(target=client_side)
    t.start()
    rc = uvloop.run(daemon.run())
    t.join(30)
    assert rc == 1
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "start" and kinds.count("delta") >= 1
    assert kinds[-1] == "error" and "illegal memory access" in frames[-1]["message"]
    assert "engine failed" in notify.wait_for("STOPPING", "1", timeout=5).get("STATUS", "")
    assert not os.path.exists(sock)
    notify.close()


def test_watchdog_pings_only_while_the_engine_progresses(tmp_path: Path, default_gguf: Path) -> None:
    """WATCHDOG=1 flows while idle and while steps advance; a step that hangs (a wedged GPU)
    stops the pings, so that systemd's WatchdogSec kills and restarts the daemon."""
    sock = str(tmp_path / "d.sock")
    config = parse_config(TEST_CONFIG, source=str(tmp_path / "c.yaml"))
    notify = NotifyListener(tmp_path / "notify.sock")
    # WATCHDOG_USEC=200 ms: a ping every 0.1 s; a step stale for 2 intervals withholds them
    notifier = systemd.Notifier({"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"})
    service = Service(config)
    daemon = ServeDaemon(service, open_listeners(config, sock), notifier)
    client = Daemon(None, sock, tmp_path / "c.yaml", tmp_path / "log", notify)  # type: ignore[arg-type]
    seen: dict[str, Any] = {}

    def pings(seconds: float) -> int:
        # Datagrams wait in the socket until wait_for reads them: drop the ones sent before
        # this window (e.g. idle pings between the idle count and the hang), then count.
        notify.sock.setblocking(False)
        try:
            while True:
                notify.sock.recv(65536)
        except BlockingIOError:
            pass
        notify.messages.clear()
        end = time.monotonic() + seconds
        n = 0
        while (left := end - time.monotonic()) > 0:
            try:
                notify.wait_for("WATCHDOG", "1", timeout=left)
                n += 1
            except TimeoutError:
                break
        return n

    def client_side() -> None:
        try:
            notify.wait_for("READY", "1")
            seen["idle"] = pings(1.0)
            runner = service.engine.runner
            real = runner.execute
            release = threading.Event()
            hung = threading.Event()

            def hanging(*args: Any) -> Any:
                if not release.is_set():
                    hung.set()
                    release.wait(30)
                return real(*args)

            runner.execute = hanging
            t = threading.Thread(target=lambda: seen.setdefault("frames", list(client.stream_native(
                {"prompt": "Hello", "max_tokens": 3, "ignore_eos": True}))))
            t.start()
            hung.wait(30)
            time.sleep(0.5)  # the step is now stale by more than 2 intervals
            seen["hung"] = pings(1.0)
            release.set()
            t.join(30)
            seen["after"] = pings(1.0)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=client_side)
    t.start()
    rc = uvloop.run(daemon.run())
    t.join(30)
    notify.close()
    assert rc == 0
    assert seen["idle"] >= 5 and seen["hung"] == 0 and seen["after"] >= 5, seen
    assert seen["frames"][-1]["type"] == "end"


def test_failed_step_fails_its_requests_and_the_daemon_serves_on(tmp_path: Path, default_gguf: Path) -> None:
    """An exception inside one step that is not a device error (here a plain RuntimeError)
    ends that step's request with a terminal error frame; the daemon keeps running, reports
    nothing fatal, frees the blocks, and the next request is served as usual."""
    sock = str(tmp_path / "d.sock")
    config = parse_config(TEST_CONFIG, source=str(tmp_path / "c.yaml"))
    notify = NotifyListener(tmp_path / "notify.sock")
    notifier = systemd.Notifier({"NOTIFY_SOCKET": notify.path})
    service = Service(config)
    daemon = ServeDaemon(service, open_listeners(config, sock), notifier)
    client = Daemon(None, sock, tmp_path / "c.yaml", tmp_path / "log", notify)  # type: ignore[arg-type]
    seen: dict[str, Any] = {}

    def client_side() -> None:
        try:
            notify.wait_for("READY", "1")
            runner = service.engine.runner
            real = runner.execute
            calls = {"n": 0}

            def failing_once(*args: Any) -> Any:
                calls["n"] += 1
                if calls["n"] == 4:
                    raise RuntimeError("index 7 is out of bounds for dimension 0 with size 3")
                return real(*args)

            runner.execute = failing_once
            seen["failed"] = list(client.stream_native({"prompt": "Once upon a time", "max_tokens": 30,
                                                         "ignore_eos": True}))
            seen["next"] = list(client.stream_native({"prompt": "Hello", "max_tokens": 5, "ignore_eos": True}))
            time.sleep(0.2)
            seen["status"] = client.request("GET", "/v1/status").json()
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=client_side)
    t.start()
    rc = uvloop.run(daemon.run())
    t.join(30)
    notify.close()
    assert rc == 0
    kinds = [f["type"] for f in seen["failed"]]
    assert kinds[0] == "start" and kinds.count("delta") >= 1
    assert kinds[-1] == "error" and seen["failed"][-1]["status"] == 500
    assert "out of bounds" in seen["failed"][-1]["message"]
    assert seen["next"][-1]["type"] == "end" and seen["next"][-1]["usage"]["completion_tokens"] == 5
    s = seen["status"]
    assert s["engine_error"] is None and s["state"] == "ready" and s["kv_blocks_used"] == 0 and s["running"] == 0
