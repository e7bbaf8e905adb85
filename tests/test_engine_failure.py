"""A failed engine step (what a poisoned CUDA context looks like from Python) fails every
request in flight with a terminal error frame and ends the daemon with exit status 1, so that
systemd restarts it instead of it serving errors for hours.

Runs the daemon in-process (the real Service, engine, model and server) so that the fault can
be injected into the model runner after start-up."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import uvloop
from daemon_util import TEST_CONFIG, Daemon, NotifyListener

from inflightd import systemd
from inflightd.config import parse_config
from inflightd.serve import Daemon as ServeDaemon
from inflightd.serve import open_listeners
from inflightd.service import Service

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
