"""The daemon's lifecycle, each test with its own `inflightd serve` subprocess: sd_notify
(READY → RELOADING/READY → STOPPING), live reload under load, drain on SIGTERM, socket
activation, socket safety (a second daemon, a stale socket), peer credentials."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_util import INFLIGHTD, TEST_CONFIG, Daemon, NotifyListener, UnixHTTPConnection, start_daemon

pytestmark = pytest.mark.slow


def _stream_all(d: Daemon, body: dict[str, Any], out: list[list[dict[str, Any]]]) -> None:
    out.append(list(d.stream_native(body)))


def test_reload_under_load_notify_and_drain(tmp_path: Path, default_gguf: Path) -> None:
    d = start_daemon(tmp_path)
    try:
        status = d.request("GET", "/v1/status").json()
        assert status["scheduler_in_force"]["max_queue_delay_ms"] == 2
        assert status["scheduler_in_force"]["max_num_seqs"] == 16
        # four streams in flight while the config changes under them
        results: list[list[dict[str, Any]]] = []
        body = {"prompt": "Tell me a story about a dragon.", "max_tokens": 48, "ignore_eos": True, "temperature": 0}
        threads = [threading.Thread(target=_stream_all, args=(d, body, results)) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        d.config_path.write_text(TEST_CONFIG.replace("max_queue_delay_ms: 2", "max_queue_delay_ms: 7")
                                 .replace("max_num_seqs: 16", "max_num_seqs: 3"))
        d.proc.send_signal(signal.SIGHUP)
        reloading = d.notify.wait_for("RELOADING", "1", timeout=30)
        now_us = time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6
        assert abs(int(reloading["MONOTONIC_USEC"]) - now_us) < 30e6
        d.notify.wait_for("READY", "1", timeout=30)
        status = d.request("GET", "/v1/status").json()
        assert status["scheduler_in_force"]["max_queue_delay_ms"] == 7
        assert status["scheduler_in_force"]["max_num_seqs"] == 3
        assert status["last_reload"]["ok"] and "scheduler.max_num_seqs" in status["last_reload"]["applied"]

        # an invalid file changes nothing; the error is visible in /v1/status and STATUS=
        d.config_path.write_text("scheduler: {max_num_seqs: [oops\n")
        d.proc.send_signal(signal.SIGHUP)
        d.notify.wait_for("RELOADING", "1", timeout=30)
        ready = d.notify.wait_for("READY", "1", timeout=30)
        assert "reload failed" in ready.get("STATUS", ""), ready
        status = d.request("GET", "/v1/status").json()
        assert not status["last_reload"]["ok"] and "invalid YAML" in status["last_reload"]["error"]
        assert status["scheduler_in_force"]["max_num_seqs"] == 3
        # a restart-only key is reported, not applied
        d.config_path.write_text(TEST_CONFIG.replace("block_size: 16", "block_size: 32"))
        r = d.request("POST", "/v1/reload")
        assert r.status == 200 and r.json()["restart_required"] == ["kv_cache.block_size"]
        assert d.request("GET", "/v1/status").json()["config"]["kv_cache"]["block_size"] == 16

        for t in threads:
            t.join(120)
        assert len(results) == 4
        for frames in results:  # every stream completed, none restarted
            assert [f["type"] for f in frames].count("start") == 1
            assert frames[-1]["type"] == "end" and frames[-1]["usage"]["completion_tokens"] == 48

        # a second daemon on the same path refuses to start; the first keeps serving
        second = subprocess.run([INFLIGHTD, "serve", "--config", str(d.config_path), "--socket", d.socket_path],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "another daemon is serving" in second.stderr
        assert d.request("GET", "/health").status == 200

        # SIGTERM with a request in flight: STOPPING, the request finishes (drain), exit 0
        late: list[list[dict[str, Any]]] = []
        t = threading.Thread(target=_stream_all, args=(d, {**body, "max_tokens": 24}, late))
        t.start()
        deadline = time.monotonic() + 30
        while d.request("GET", "/v1/status").json()["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        d.proc.send_signal(signal.SIGTERM)
        d.notify.wait_for("STOPPING", "1", timeout=30)
        t.join(60)
        assert late and late[0][-1]["type"] == "end" and late[0][-1]["usage"]["completion_tokens"] == 24
        assert d.proc.wait(60) == 0
        assert not os.path.exists(d.socket_path)
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        d.notify.close()


def test_queue_full_then_drain_timeout_aborts(tmp_path: Path, default_gguf: Path) -> None:
    config = (TEST_CONFIG.replace("drain_timeout_s: 30", "drain_timeout_s: 0.5")
              .replace("max_num_seqs: 16", "max_num_seqs: 1, max_waiting: 1"))
    d = start_daemon(tmp_path, config=config)
    try:
        long = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}
        running = d.stream_native(long)
        assert next(running)["type"] == "start"
        waited: list[list[dict[str, Any]]] = []  # waits behind the running one
        t = threading.Thread(target=_stream_all, args=(d, long, waited))
        t.start()
        deadline = time.monotonic() + 30
        while d.request("GET", "/v1/status").json()["queue_depth"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = d.request("POST", "/v1/generate", {"prompt": "hi"}, kind="msgpack")
        assert r.status == 503 and r.headers["retry-after"] == "1"
        assert "max_waiting = 1" in r.msgpack()["error"]["message"]
        # SIGTERM: the drain window (0.5 s) is too short; both get a terminal abort frame
        d.proc.send_signal(signal.SIGTERM)
        rest = list(running)
        assert rest[-1]["type"] == "end" and rest[-1]["finish_reason"] == "abort"
        t.join(60)
        frames = waited[0]
        assert [f["type"] for f in frames] == ["start", "end"] and frames[-1]["finish_reason"] == "abort"
        assert frames[-1]["usage"]["completion_tokens"] == 0
        assert d.proc.wait(60) == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        d.notify.close()


_LAUNCHER = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def test_socket_activation(tmp_path: Path, default_gguf: Path) -> None:
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    cfg = tmp_path / "inflightd.yaml"
    cfg.write_text(TEST_CONFIG)
    notify = NotifyListener(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": notify.path}
    # no --socket: the daemon must take fd 3, not bind a path of its own
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(listener.fileno()), INFLIGHTD, "serve", "--config", str(cfg)],
        pass_fds=(listener.fileno(),), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    listener.close()  # the daemon holds the only copy now, as under systemd
    d = Daemon(proc, path, cfg, tmp_path / "none.log", notify)
    try:
        notify.wait_for("READY", "1", proc=proc)
        r = d.request("POST", "/v1/completions", {"prompt": "The sky is", "max_tokens": 4})
        assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert os.path.exists(path)  # the socket belongs to the socket unit: left in place
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()


def test_stale_socket_replaced_and_peer_check(tmp_path: Path, default_gguf: Path) -> None:
    # outside pytest's 0700 temp tree, so that another uid can reach the socket at all
    public = Path(tempfile.mkdtemp(prefix="inflightd-test-"))
    public.chmod(0o755)
    sock = str(public / "shared.sock")
    first = start_daemon(tmp_path / "a", socket_path=sock)
    first.proc.kill()  # SIGKILL: the socket file stays behind
    first.proc.wait(30)
    first.notify.close()
    assert os.path.exists(sock)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    cfg = TEST_CONFIG + f'listen: {{socket_mode: "0666", tcp: "127.0.0.1:{port}"}}\n'
    d = start_daemon(tmp_path / "b", socket_path=sock, config=cfg)
    try:
        assert d.request("GET", "/health").status == 200
        tcp = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # the optional loopback listener
        tcp.request("GET", "/v1/models")
        assert tcp.getresponse().status == 200
        tcp.close()
        assert oct(os.stat(sock).st_mode & 0o777) == "0o666"
        if os.geteuid() == 0:  # a peer that is neither root, our uid nor in the socket's group
            # (everything imported before dropping root: the interpreter may live under /root)
            code = (
                "import os, socket, sys; os.setgroups([]); os.setgid(65534); os.setuid(65534); "
                "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                "s.sendall(b'GET /health HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n'); "
                "sys.stdout.write(b''.join(iter(lambda: s.recv(4096), b'')).decode())"
            )
            out = subprocess.run([sys.executable, "-c", code, sock], capture_output=True, text=True, timeout=60)
            assert out.stdout.startswith("HTTP/1.1 403") and "not allowed" in out.stdout, out
        conn = UnixHTTPConnection(sock)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        # limits.request_timeout_s (live): a stream past it ends with a 504 error frame
        d.config_path.write_text(cfg.replace("drain_timeout_s: 30", "drain_timeout_s: 30, request_timeout_s: 1.5"))
        assert d.request("POST", "/v1/reload").json()["applied"] == ["limits.request_timeout_s"]
        frames = list(d.stream_native({"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}))
        assert frames[-1]["type"] == "error" and frames[-1]["status"] == 504, frames[-1]
        assert "request_timeout_s" in frames[-1]["message"]
        deadline = time.monotonic() + 10
        while d.request("GET", "/v1/status").json()["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        assert d.stop() == 0
        shutil.rmtree(public, ignore_errors=True)
