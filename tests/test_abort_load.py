"""vLLM's abort test over the real daemon and both protocols: 100 concurrent streams, every
10th client disconnects mid-stream; the other 90 give exactly the tokens (native) or text
(OpenAI) they give alone, greedy; afterwards nothing runs or waits and every KV block is free.
Then the same while the config is reloaded every 200 ms, alternating two scheduler settings."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from daemon_util import Daemon, UnixHTTPConnection, start_daemon

pytestmark = pytest.mark.slow

CONFIG = """\
model: {path: default, dtype: float32, device: cpu}
scheduler: {max_queue_delay_ms: 2, max_num_seqs: 16, max_num_batched_tokens: 2048}
kv_cache: {block_size: 16, memory: 256MiB}
limits: {max_model_len: 2048, default_max_tokens: 64}
"""
OTHER = CONFIG.replace("max_queue_delay_ms: 2, max_num_seqs: 16", "max_queue_delay_ms: 0, max_num_seqs: 8")
PROMPTS = [f"Count from {i} upwards:" for i in range(20)]
MAX_TOKENS = 12
N = 100


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[Daemon]:
    daemon = start_daemon(tmp_path_factory.mktemp("abort"), config=CONFIG)
    yield daemon
    rc = daemon.stop()
    assert rc == 0, f"daemon exited {rc}; log:\n{daemon.log()}"


def _body(i: int, native: bool) -> dict[str, Any]:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            **({} if native else {"stream": True})}


def _native(d: Daemon, i: int, leave_after: int | None) -> tuple[list[int], str | None]:
    """Token ids and the terminal frame's type ("end"/"error"), or None when it left early."""
    conn = UnixHTTPConnection(d.socket_path, 300)
    conn.request("POST", "/v1/generate", msgpack.packb(_body(i, True)), headers={"Content-Type": "application/msgpack"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    unpacker = msgpack.Unpacker(raw=False)
    ids: list[int] = []
    deltas = 0
    try:
        while chunk := r.read1(65536):
            unpacker.feed(chunk)
            for f in unpacker:
                if f["type"] == "delta":
                    ids += f["token_ids"]
                    deltas += 1
                    if leave_after is not None and deltas >= leave_after:
                        assert conn.sock is not None
                        conn.sock.shutdown(socket.SHUT_RDWR)
                        return ids, None
                elif f["type"] in ("end", "error"):
                    return ids, f["type"]
        return ids, "truncated"
    finally:
        conn.close()


def _openai(d: Daemon, i: int, leave_after: int | None) -> tuple[str, str | None]:
    """Text and "end" once `data: [DONE]` came after a finish_reason, or None when it left."""
    conn = UnixHTTPConnection(d.socket_path, 300)
    conn.request("POST", "/v1/completions", json.dumps(_body(i, False)), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    text, buf, chunks, finished = "", b"", 0, False
    try:
        while chunk := r.read1(65536):
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]":
                    return text, "end" if finished else "truncated"
                obj = json.loads(data)
                if "error" in obj:
                    return text, "error"
                text += obj["choices"][0]["text"]
                finished = finished or obj["choices"][0]["finish_reason"] == "length"
                chunks += 1
                if leave_after is not None and chunks >= leave_after:
                    assert conn.sock is not None
                    conn.sock.shutdown(socket.SHUT_RDWR)
                    return text, None
        return text, "truncated"
    finally:
        conn.close()


def _alone(d: Daemon) -> dict[int, Any]:
    """Each prompt by itself, on each protocol (its own request, nothing else running)."""
    out: dict[int, Any] = {}
    for i in range(len(PROMPTS)):
        out[2 * i] = _native(d, i, None)[0]
        out[2 * i + 1] = _openai(d, i, None)[0]
    return out


@pytest.fixture(scope="module")
def alone(d: Daemon) -> dict[int, Any]:
    return _alone(d)


def _wait_idle(d: Daemon) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        s = d.request("GET", "/v1/status").json()
        if s["running"] == 0 and s["queue_depth"] == 0 and s["kv_blocks_used"] == 0:
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.05)


def _run_100(d: Daemon, alone: dict[int, Any]) -> None:
    results: dict[int, tuple[Any, str | None]] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            native = i % 2 == 0
            leave = 3 if i % 10 == 0 else None
            results[i] = (_native if native else _openai)(d, i // 2, leave)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors[:3]
    for i in range(N):
        got, end = results[i]
        if i % 10 == 0:
            assert end is None  # it left after 3 deltas, before the end
        else:
            key = 2 * ((i // 2) % len(PROMPTS)) + (i % 2)
            assert end == "end", (i, end)
            assert got == alone[key], (i, got, alone[key])
    s = _wait_idle(d)
    assert s["engine_error"] is None


def test_every_tenth_disconnects(d: Daemon, alone: dict[int, Any]) -> None:
    _run_100(d, alone)


def test_every_tenth_disconnects_while_reloading(d: Daemon, alone: dict[int, Any]) -> None:
    stop = threading.Event()
    reloads: list[dict[str, Any]] = []

    def reloader() -> None:
        k = 0
        while not stop.wait(0.2):
            k += 1
            d.config_path.write_text(OTHER if k % 2 else CONFIG)
            reloads.append(d.request("POST", "/v1/reload").json())

    t = threading.Thread(target=reloader)
    t.start()
    try:
        _run_100(d, alone)
    finally:
        stop.set()
        t.join(10)
        d.config_path.write_text(CONFIG)
        assert d.request("POST", "/v1/reload").json()["ok"]
    assert len(reloads) >= 3 and all(r["ok"] for r in reloads), reloads[:3]
    assert any("scheduler.max_num_seqs" in r["applied"] for r in reloads)
