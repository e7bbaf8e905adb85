"""What a hostile or broken local client can do to the real daemon, and what it must not be able
to do: each test is a probe that once stopped the daemon, half-applied a reload, pinned KV
blocks or held connections open, and checks the fix (a clear 4xx naming the problem, nothing
else lost).

One daemon for the module, with short timeouts (read 1 s, write 2 s, keep-alive 1 s) and a
connection cap of 24, started with `--model PATH` so that reloads show how command-line
overrides are treated.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from daemon_util import Daemon, Response, start_daemon

pytestmark = pytest.mark.slow

CONFIG = """\
model: {path: default, dtype: float32, device: cpu}
scheduler: {max_queue_delay_ms: 2, max_num_seqs: 16, max_num_batched_tokens: 2048}
kv_cache: {block_size: 16, memory: 256MiB}
limits: {max_model_len: 2048, default_max_tokens: 64, read_timeout_s: 1, write_timeout_s: 2,
         keepalive_timeout_s: 1, max_connections: 24}
"""
CHAT = [{"role": "user", "content": "Tell me a story."}]
JSON_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/tokenize", "/v1/detokenize")


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[Daemon]:
    daemon = start_daemon(tmp_path_factory.mktemp("hardening"), config=CONFIG, args=["--model", str(default_gguf)])
    yield daemon
    rc = daemon.stop()
    assert rc == 0, f"daemon exited {rc}; log:\n{daemon.log()}"


def status(d: Daemon) -> dict[str, Any]:
    r = d.request("GET", "/v1/status")
    assert r.status == 200
    return r.json()


def assert_idle(d: Daemon, timeout: float = 15.0) -> None:
    """Nothing running or queued and every KV block free (aborts are released at the next
    step boundary, so this may take a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        s = status(d)
        if s["running"] == 0 and s["queue_depth"] == 0 and s["kv_blocks_used"] == 0:
            break
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    assert d.proc.poll() is None


def error(r: Response) -> str:
    body = r.msgpack() if r.headers.get("content-type", "").startswith("application/msgpack") else r.json()
    return str(body["error"]["message"])


def native(d: Daemon, body: Any, **kw: Any) -> Response:
    return d.request("POST", "/v1/generate", body, kind="msgpack", **kw)


def reload_with(d: Daemon, text: str | bytes) -> Response:
    if isinstance(text, bytes):
        d.config_path.write_bytes(text)
    else:
        d.config_path.write_text(text)
    return d.request("POST", "/v1/reload")


class Background:
    """A greedy native stream running beside a probe; `frames` when it ends."""

    def __init__(self, d: Daemon, max_tokens: int = 40) -> None:
        self.frames: list[dict[str, Any]] = []
        self.max_tokens = max_tokens
        body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        self._thread = threading.Thread(target=lambda: self.frames.extend(d.stream_native(body)))
        self._thread.start()
        deadline = time.monotonic() + 30
        while not any(f["type"] == "delta" for f in list(self.frames)):
            assert time.monotonic() < deadline and self._thread.is_alive(), self.frames
            time.sleep(0.01)

    def finish(self) -> None:
        self._thread.join(120)
        assert self.frames[-1]["type"] == "end", self.frames[-1]
        assert self.frames[-1]["usage"]["completion_tokens"] == self.max_tokens


# ------------------------------------------------------------------- D1: one request poisons
def test_out_of_range_seed_is_refused_and_queues_nothing(d: Daemon) -> None:
    """The seed used to be checked by torch after the sequence was queued: the next step failed
    every stream in flight and the daemon exited."""
    beside = Background(d)
    for seed in (-(2**63) - 1, 2**64):
        r = d.request("POST", "/v1/chat/completions", {"messages": CHAT, "seed": seed, "max_tokens": 4})
        assert r.status == 400 and error(r).startswith("seed:"), r.body
        r = d.request("POST", "/v1/completions", {"prompt": "Hi", "seed": seed, "max_tokens": 4})
        assert r.status == 400 and error(r).startswith("seed:"), r.body
    for seed in (-(2**63), 2**64 - 1):  # the extremes torch takes are fine
        r = d.request("POST", "/v1/completions", {"prompt": "Hi", "seed": seed, "max_tokens": 2})
        assert r.status == 200, r.body
    beside.finish()
    assert_idle(d)


# ------------------------------------------------------------------------- D4/D5: values
@pytest.mark.parametrize("route", JSON_ROUTES)
def test_deep_nesting_and_huge_integers_are_400(d: Daemon, route: str) -> None:
    r = d.request("POST", route, b"[" * 100_000 + b"]" * 100_000, headers={"Content-Type": "application/json"})
    assert r.status == 400 and "nested" in error(r)
    nested: Any = "x"
    for _ in range(70):
        nested = {"a": nested}
    r = d.request("POST", route, {"messages": CHAT, "prompt": "x", "text": "x", "tokens": [1], "extra": nested})
    assert r.status == 400 and "nested more than 64 levels" in error(r)
    body = b'{"messages": [{"role": "user", "content": "x"}], "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"
    r = d.request("POST", route, body, headers={"Content-Type": "application/json"})
    assert r.status == 400 and "not valid JSON" in error(r) and "digits" in error(r)


def test_numbers_beyond_float_range_are_400(d: Daemon) -> None:
    big = b"1" + b"0" * 400
    for key in (b"temperature", b"top_p", b"repetition_penalty", b"presence_penalty"):
        body = b'{"messages": [{"role": "user", "content": "x"}], "' + key + b'": ' + big + b"}"
        r = d.request("POST", "/v1/chat/completions", body, headers={"Content-Type": "application/json"})
        assert r.status == 400 and error(r).startswith(key.decode() + ":"), r.body


def test_tiny_temperature_is_greedy_and_tiny_penalty_is_refused(d: Daemon) -> None:
    """temperature 1e-308 used to divide the logits to inf and repeat one garbage token."""
    base = {"prompt": "The capital of France is", "max_tokens": 12, "stream": False}
    greedy = native(d, {**base, "temperature": 0}).msgpack()
    tiny = native(d, {**base, "temperature": 1e-308, "seed": 7}).msgpack()
    assert tiny["token_ids"] == greedy["token_ids"] and len(set(greedy["token_ids"])) > 3
    for value in (1e-308, 1e308, 0.0):
        r = native(d, {**base, "repetition_penalty": value})
        assert r.status == 400 and error(r).startswith("repetition_penalty:"), r.body
    r = native(d, {**base, "temperature": 1e308})
    assert r.status == 400 and error(r).startswith("temperature:")


# ------------------------------------------------------------------------------ D7: messages
def test_messages_name_the_problem(d: Daemon) -> None:
    deep: Any = 1
    for _ in range(200):
        deep = [deep]
    r = d.request("POST", "/v1/generate", msgpack.packb({"prompt": "x", "stop": deep}),
                  headers={"Content-Type": "application/msgpack"})
    assert r.status == 400 and "nested more than 64 levels" in error(r)
    r = d.request("POST", "/v1/generate", b"\x91" * 5000 + b"\x01", headers={"Content-Type": "application/msgpack"})
    assert r.status == 400 and "nested" in error(r)
    r = native(d, {"messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status == 400 and "messages[0].role" in error(r) and "wizard" in error(r)
    r = d.request("POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status == 400 and "messages[0].role" in error(r)
    for role in ([], {}, 3):  # found by tests/test_fuzz.py: an unhashable role was a 500
        r = d.request("POST", "/v1/chat/completions", {"messages": [{"role": role, "content": "hi"}]})
        assert r.status == 400 and "messages[0].role" in error(r)
    r = native(d, {"prompt": "x", "stop_token_ids": [10**6]})
    assert r.status == 400 and error(r).startswith("stop_token_ids:") and "vocabulary" in error(r)
    r = native(d, {"prompt": "x", "stop": [f"s{i}" for i in range(17)]})
    assert r.status == 400 and error(r).startswith("stop: at most 16")
    r = d.request("POST", "/v1/chat/completions", {"messages": CHAT, "stop": [f"s{i}" for i in range(17)]})
    assert r.status == 400 and error(r).startswith("stop: at most 16")
    for ctype in ("text/plain", "application/json", None, "application/msgpack\xff"):
        headers = {"Content-Type": ctype} if ctype else {}
        r = d.request("POST", "/v1/generate", msgpack.packb({"prompt": "x", "max_tokens": 1}), headers=headers)
        assert r.status == 415 and "msgpack" in error(r), (ctype, r.body)
    r = d.request("POST", "/v1/generate", msgpack.packb({"prompt": "x", "max_tokens": 1, "stream": False}),
                  headers={"Content-Type": "application/x-msgpack"})
    assert r.status == 200
    # "developer" is OpenAI's newer name for the system message
    r = d.request("POST", "/v1/chat/completions", {"messages": [{"role": "developer", "content": "Be brief."},
                                                                {"role": "user", "content": "Hi"}],
                                                   "max_tokens": 2})
    assert r.status == 200
    assert_idle(d)


# ---------------------------------------------------------------------- D2: reload transaction
def test_reload_is_all_or_nothing(d: Daemon) -> None:
    good = d.config_path.read_text()
    before = status(d)
    try:
        bad = good.replace("max_num_seqs: 16", "max_num_seqs: 4096").replace("default_max_tokens: 64",
                                                                               "default_max_tokens: 7")
        r = reload_with(d, bad)
        assert r.status == 400
        result = r.json()
        assert not result["ok"] and "scheduler.max_num_batched_tokens" in result["error"] and "4096" in result["error"]
        s = status(d)
        assert s["config"] == before["config"] and s["scheduler_in_force"] == before["scheduler_in_force"]
        assert s["last_reload"]["ok"] is False and s["last_reload"]["error"] == result["error"]
        for text, needle in [
            (b"\xff\xfe\x00binary", "not UTF-8"),
            (b"limits: " + b"[" * 50_000, "nested too deeply"),
            (b"limits: {max_model_len: " + b"9" * 5000 + b"}", "invalid YAML"),
            (b"slo: {ttft_ms: 1" + b"0" * 400 + b"}", "slo.ttft_ms"),
            (b"\x00\x01\x02", "invalid YAML"),
        ]:
            r = reload_with(d, text)
            assert r.status == 400 and needle in r.json()["error"], (text[:30], r.body)
            assert status(d)["config"] == before["config"]
        # SIGHUP takes the same path: an error in the status, no traceback in the log
        reload_with(d, b"\xff")
        d.proc.send_signal(signal.SIGHUP)
        d.notify.wait_for("RELOADING", "1", timeout=10)
        deadline = time.monotonic() + 10
        while "not UTF-8" not in (status(d)["last_reload"] or {}).get("error", "") or status(d)["last_reload"]["ok"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "Traceback" not in d.log()
    finally:
        r = reload_with(d, good)
    result = r.json()
    assert result["ok"], result
    # the command line's --model PATH is what runs: a file that says "default" changes nothing
    assert result["restart_required"] == [] and "model.path" not in result["applied"]
    assert status(d)["config"] == before["config"]


# --------------------------------------------------------------- D3: a client that stops reading
def _stalled_stream(d: Daemon) -> socket.socket:
    """A chat stream with top_logprobs 20 (~1.5 kB a token) whose client never reads."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.socket_path)
    body = json.dumps({"messages": CHAT, "max_tokens": 1500, "ignore_eos": True, "stream": True,
                       "logprobs": True, "top_logprobs": 20}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return s


def _wait_freed(d: Daemon, timeout: float) -> float:
    """Seconds until nothing runs and no block is held."""
    t0 = time.monotonic()
    while status(d)["running"] == 0:  # first it runs
        assert time.monotonic() - t0 < 30
        time.sleep(0.02)
    t0 = time.monotonic()
    while True:
        s = status(d)
        if s["running"] == 0 and s["kv_blocks_used"] == 0:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, s
        time.sleep(0.05)


def test_client_that_stops_reading_is_dropped(d: Daemon) -> None:
    """limits.write_timeout_s (2 s here): once the socket buffers are full, a client that takes
    nothing for 2 s loses its request and its blocks, while its socket is still open."""
    s = _stalled_stream(d)
    try:
        _wait_freed(d, timeout=60)
        assert "read nothing for 2 s" in d.log()
    finally:
        s.close()
    assert_idle(d)


def test_request_timeout_holds_whatever_the_socket_does(d: Daemon) -> None:
    """limits.request_timeout_s aborts the request in the engine when it expires, not when its
    handler next gets to read (it may be stuck writing to a client that stopped reading)."""
    good = d.config_path.read_text()
    r = reload_with(d, good.replace("write_timeout_s: 2", "write_timeout_s: 600").replace(
        "keepalive_timeout_s: 1,", "keepalive_timeout_s: 1, request_timeout_s: 1.5,"))
    assert r.json()["ok"], r.body
    try:
        s = _stalled_stream(d)
        t0 = time.monotonic()
        _wait_freed(d, timeout=20)
        assert time.monotonic() - t0 < 10
        s.close()
    finally:
        assert reload_with(d, good).json()["ok"]
    assert_idle(d)


# ------------------------------------------------------------- D6: slow and idle connections
def _raw(d: Daemon, data: bytes = b"") -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    s.connect(d.socket_path)
    if data:
        s.sendall(data)
    return s


def _read_until_closed(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def test_slow_or_short_bodies_get_408_and_the_connection_closes(d: Daemon) -> None:
    # announces 100 bytes, sends 10
    s = _raw(d, HEAD + b"Content-Length: 100\r\n\r\n" + b'{"messages')
    t0 = time.monotonic()
    answer = _read_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 408") and b"read_timeout_s" in answer
    assert time.monotonic() - t0 < 5
    # a body trickled at 5 bytes a second
    s = _raw(d, HEAD + b"Content-Length: 200\r\n\r\n")
    t0 = time.monotonic()
    s.settimeout(0.2)
    got = b""
    for _ in range(40):
        try:
            s.sendall(b"     ")
            got += s.recv(65536)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass
        if got:
            break
    assert got.startswith(b"HTTP/1.1 408"), got
    assert time.monotonic() - t0 < 5
    s.close()
    # a chunk that announces 2^64 - 1 bytes
    s = _raw(d, HEAD + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc")
    t0 = time.monotonic()
    answer = _read_until_closed(s)
    assert answer[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - t0 < 5
    assert d.request("GET", "/health").status == 200


def test_idle_and_slow_header_connections_close(d: Daemon) -> None:
    idle = [_raw(d) for _ in range(10)]
    slow = _raw(d, b"POST /v1/generate HTTP/1.1\r\n")
    t0 = time.monotonic()
    for i in range(8):  # a header byte every 0.3 s: never a whole request head
        try:
            slow.sendall(b"X"[: i + 1])
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.3)
    for s in [*idle, slow]:
        assert _read_until_closed(s) == b""  # closed by the daemon, nothing sent
        s.close()
    assert time.monotonic() - t0 < 6  # keepalive_timeout_s is 1 s


def test_connection_cap(d: Daemon) -> None:
    held = [_raw(d) for _ in range(24)]
    try:
        extra = _raw(d)
        answer = _read_until_closed(extra)
        assert answer.startswith(b"HTTP/1.1 503") and b"max_connections" in answer and b"Retry-After: 1" in answer
        extra.close()
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert d.request("GET", "/health").status == 200


# ------------------------------------------------------------------------ Triton's queue tests
def _full_queue_config(good: str) -> str:
    return good.replace("max_num_seqs: 16", "max_num_seqs: 1, max_waiting: 1").replace(
        "keepalive_timeout_s: 1,", "keepalive_timeout_s: 1, queue_timeout_s: 1,")


def _refusal(r: Response, native_route: bool) -> str:
    assert r.status == 503 and r.headers.get("retry-after") == "1", (r.status, r.body)
    body = r.msgpack() if native_route else r.json()
    return str(body["error"]["message"])


def test_queue_full_and_queue_timeout_over_both_protocols(d: Daemon) -> None:
    """max_num_seqs 1, max_waiting 1, queue_timeout_s 1: with one request running and one
    waiting, a third is refused at once (queue full); the waiting one is refused when its second
    in the queue is up — each with 503 and Retry-After, in the route's own encoding, streaming
    or not; the running request is untouched."""
    good = d.config_path.read_text()
    assert reload_with(d, _full_queue_config(good)).json()["ok"]
    try:
        for native_route in (True, False):
            for stream in (True, False):
                beside = Background(d, max_tokens=600)  # seconds of decoding: longer than the timeout
                results: dict[str, Response] = {}
                if native_route:
                    route, body = "/v1/generate", {"prompt": "Hello", "max_tokens": 4, "stream": stream}
                else:
                    route, body = "/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, "stream": stream}

                def send(name: str, results: dict[str, Response] = results, route: str = route,
                         body: dict[str, Any] = body) -> None:
                    kind = "msgpack" if route == "/v1/generate" else "json"
                    results[name] = d.request("POST", route, body, kind=kind)
                waiting = threading.Thread(target=send, args=("waiting",))
                t0 = time.monotonic()
                waiting.start()
                deadline = time.monotonic() + 5
                while status(d)["queue_depth"] < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                send("full")
                assert "queue full" in _refusal(results["full"], native_route)
                waiting.join(30)
                assert "queue_timeout_s" in _refusal(results["waiting"], native_route)
                assert 0.9 < time.monotonic() - t0 < 4
                assert beside._thread.is_alive()  # the timeout came while it still ran
                beside.finish()
        metrics = d.request("GET", "/metrics").body.decode()
        rejected = re.search(r'^inflightd:request_rejected_total\{status="503"\} (\S+)$', metrics, re.M)
        assert rejected and float(rejected.group(1)) >= 8
    finally:
        assert reload_with(d, good).json()["ok"]
    assert_idle(d)
