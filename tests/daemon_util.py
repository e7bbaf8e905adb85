"""Starting the real daemon (`inflightd serve`) as a subprocess on a temporary socket, and a
small HTTP client over that socket for the tests (the stdlib's, so that the daemon is judged by
a client that is not its own).

Readiness is awaited through a `NOTIFY_SOCKET` the test binds itself: the daemon sends READY=1
after the model is loaded and every kernel compiled, so no test polls /health.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

INFLIGHTD = str(Path(sys.executable).with_name("inflightd"))

# Small KV cache: tests start several daemons, each would otherwise reserve half the RAM.
TEST_CONFIG = """\
model: {path: default, dtype: float32, device: cpu}
scheduler: {max_queue_delay_ms: 2, max_num_seqs: 16, max_num_batched_tokens: 2048}
kv_cache: {block_size: 16, memory: 256MiB}
limits: {max_model_len: 2048, default_max_tokens: 64, drain_timeout_s: 30}
"""


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 120.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def msgpack(self) -> Any:
        return msgpack.unpackb(self.body, raw=False)


class NotifyListener:
    """A datagram socket to pass as NOTIFY_SOCKET; collects the daemon's messages."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def wait_for(
        self, key: str, value: str | None = None, timeout: float = 180.0, proc: subprocess.Popen[bytes] | None = None
    ) -> dict[str, str]:
        """The first message (already received or arriving) that sets `key` (to `value`);
        gives up early when `proc` has exited."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for m in self.messages[seen:]:
                if key in m and (value is None or m[key] == value):
                    self.messages.remove(m)  # consume it: a later wait needs a later message
                    return m
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {key}={value} within {timeout} s; got {self.messages}")
            if proc is not None and proc.poll() is not None:
                raise TimeoutError(f"the daemon exited ({proc.returncode}) before {key}={value}")
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(msg)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket_path: str
    config_path: Path
    log_path: Path
    notify: NotifyListener
    env: dict[str, str] = field(default_factory=dict)

    def request(
        self, method: str, path: str, body: Any = None, *, kind: str = "json", timeout: float = 120.0,
        headers: dict[str, str] | None = None,
    ) -> Response:
        conn = UnixHTTPConnection(self.socket_path, timeout)
        try:
            hdrs = dict(headers or {})
            data: bytes | None = None
            if body is not None:
                if isinstance(body, bytes):
                    data = body
                elif kind == "msgpack":
                    data = msgpack.packb(body)
                    hdrs.setdefault("Content-Type", "application/msgpack")
                else:
                    data = json.dumps(body).encode()
                    hdrs.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=data, headers=hdrs)
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def stream_native(self, body: dict[str, Any], timeout: float = 120.0) -> Iterator[dict[str, Any]]:
        """POST /v1/generate and yield frames as they arrive (a bounded incremental Unpacker)."""
        conn = UnixHTTPConnection(self.socket_path, timeout)
        try:
            conn.request("POST", "/v1/generate", body=msgpack.packb(body),
                         headers={"Content-Type": "application/msgpack"})
            r = conn.getresponse()
            assert r.status == 200, (r.status, r.read())
            assert r.getheader("Content-Type") == "application/vnd.inflightd.stream+msgpack"
            unpacker = msgpack.Unpacker(raw=False, max_buffer_size=1 << 20)
            while True:
                chunk = r.read1(65536)
                if not chunk:
                    return
                unpacker.feed(chunk)
                yield from unpacker
        finally:
            conn.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.notify.close()


def start_daemon(
    tmp: Path, *, config: str = TEST_CONFIG, extra_env: dict[str, str] | None = None, args: list[str] | None = None,
    wait_ready: bool = True, socket_path: str | None = None, pass_fds: tuple[int, ...] = (),
    preexec_fn: Any = None, argv0: list[str] | None = None,
) -> Daemon:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "inflightd.yaml"
    cfg.write_text(config)
    sock = socket_path or str(tmp / "inflightd.sock")
    notify = NotifyListener(tmp / "notify.sock")
    env = dict(os.environ)
    env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_PID", None)
    env["NOTIFY_SOCKET"] = notify.path
    env.update(extra_env or {})
    log_path = tmp / "daemon.log"
    cmd = (argv0 or [INFLIGHTD]) + ["serve", "--config", str(cfg), "--socket", sock] + (args or [])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=pass_fds,
                                preexec_fn=preexec_fn)
    d = Daemon(proc, sock, cfg, log_path, notify, env)
    if wait_ready:
        try:
            d.notify.wait_for("READY", "1", proc=proc)
        except TimeoutError:
            proc.kill()
            raise AssertionError(f"daemon not ready; log:\n{d.log()}") from None
    return d
