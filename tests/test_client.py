"""The client side (`inflightd.client.client`, `inflightd complete | status | reload`).

- Stream parsing without a daemon: frames cut at every byte boundary, a stream without its
  terminal frame (truncated), an `error` frame, an oversized frame, a frame that is not a map.
- Socket lookup: --socket, $INFLIGHTD_SOCKET, the user's default, the system socket fallback.
- "No daemon": a missing socket file and a stale one (nothing listening) give one line naming
  the path and exit status 1, for every client command.
- Against the session's real daemon, as subprocesses with --socket: `complete` (raw and --chat,
  greedy output equal to the daemon's own non-streamed answer, --stats, an error the daemon
  refuses), `status` and `status --json`, `reload` (unchanged file; an invalid file reports the
  error and exits 1, and the file is restored and reloaded before the test ends).
- The client API: errors are typed, and closing a stream early aborts the request.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from daemon_util import INFLIGHTD, Daemon

from inflightd.client import client as client_mod
from inflightd.client.client import (
    Client,
    DaemonError,
    DaemonUnavailable,
    StreamError,
    StreamTruncated,
    parse_frames,
    resolve_socket_path,
)

FRAMES: list[dict[str, Any]] = [
    {"type": "start", "id": "0-ab", "prompt_tokens": 5, "cached_tokens": 0},
    {"type": "delta", "text": "Hé", "token_ids": [1, 2]},
    {"type": "delta", "text": " là 🐉", "token_ids": [3]},
    {
        "type": "end", "finish_reason": "length",
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "cached_tokens": 0},
        "timing": {"queue_ms": 1.0, "ttft_ms": 10.5, "tpot_ms": 5.25},
    },
]


def _packed(frames: list[dict[str, Any]]) -> bytes:
    return b"".join(msgpack.packb(f) for f in frames)


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("INFLIGHTD_SOCKET", None)
    return env


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([INFLIGHTD, *args], capture_output=True, text=True, timeout=timeout, env=_env(),
                          stdin=subprocess.DEVNULL)


# ------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1 << 20])
def test_frames_cut_anywhere(size: int) -> None:
    assert list(parse_frames(_chunks(_packed(FRAMES), size))) == FRAMES


def test_nothing_after_the_end_frame_is_read() -> None:
    data = _packed(FRAMES) + b"\xc1garbage"  # 0xc1 is never valid msgpack
    assert list(parse_frames(_chunks(data, 5))) == FRAMES


@pytest.mark.parametrize("cut", [0, 1, 2, 3])
def test_truncated_stream(cut: int) -> None:
    """Every prefix that lacks the terminal frame is an error, also one that stops inside it."""
    data = _packed(FRAMES[:cut]) if cut < 3 else _packed(FRAMES)[:-4]
    got: list[dict[str, Any]] = []
    with pytest.raises(StreamTruncated, match="truncated"):
        for frame in parse_frames(_chunks(data, 3)):
            got.append(frame)
    assert got == FRAMES[: min(cut, 3)]


def test_error_frame_raises() -> None:
    data = _packed(FRAMES[:2] + [{"type": "error", "status": 504, "message": "request timed out after 1 s"}])
    got: list[dict[str, Any]] = []
    with pytest.raises(DaemonError) as info:
        for frame in parse_frames(_chunks(data, 4)):
            got.append(frame)
    assert got == FRAMES[:2]
    assert info.value.status == 504 and "timed out" in info.value.message


def test_frame_size_is_bounded() -> None:
    huge = msgpack.packb({"type": "delta", "text": "x" * 5000, "token_ids": [1]})
    with pytest.raises(StreamError, match="larger than 1024 bytes"):
        list(parse_frames(_chunks(_packed(FRAMES[:1]) + huge, 512), max_buffer_size=1024))


@pytest.mark.parametrize("bad", [msgpack.packb([1, 2]), msgpack.packb({"text": "no type"}), b"\xc1"])
def test_frames_must_be_typed_maps(bad: bytes) -> None:
    with pytest.raises(StreamError):
        list(parse_frames([_packed(FRAMES[:1]) + bad]))


# ------------------------------------------------------------------------------ socket lookup
def test_socket_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("INFLIGHTD_SOCKET", raising=False)
    system = tmp_path / "system.sock"
    monkeypatch.setattr(client_mod, "SYSTEM_SOCKET", str(system))
    user_default = str(tmp_path / "run" / "inflightd" / "inflightd.sock")
    assert resolve_socket_path() == user_default  # neither exists: the user's default, named in errors
    system.touch()
    assert resolve_socket_path() == str(system)  # only the system service runs
    Path(user_default).parent.mkdir(parents=True)
    Path(user_default).touch()
    assert resolve_socket_path() == user_default
    monkeypatch.setenv("INFLIGHTD_SOCKET", "/from/env.sock")
    assert resolve_socket_path() == "/from/env.sock"
    assert resolve_socket_path("/explicit.sock") == "/explicit.sock"


# ---------------------------------------------------------------------------------- no daemon
@pytest.fixture
def stale_socket(tmp_path: Path) -> Iterator[str]:
    """A socket file nobody listens on (a daemon that was killed): connect() is refused."""
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    yield path


@pytest.mark.parametrize("kind", ["missing", "stale"])
def test_no_daemon_api(kind: str, tmp_path: Path, stale_socket: str) -> None:
    path = stale_socket if kind == "stale" else str(tmp_path / "missing.sock")
    c = Client(path)
    for call in (c.status, c.health, c.reload, lambda: list(c.generate_stream({"prompt": "hi"}))):
        with pytest.raises(DaemonUnavailable, match=f"no inflightd daemon is listening on {re.escape(path)}"):
            call()


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["reload"], ["complete", "hi"], ["chat"]])
def test_no_daemon_cli(command: list[str], tmp_path: Path, stale_socket: str) -> None:
    for path in (str(tmp_path / "missing.sock"), stale_socket):
        proc = _cli(*command, "--socket", path, timeout=30)
        assert proc.returncode == 1, proc
        assert proc.stderr.strip() == (
            f"inflightd {command[0]}: no inflightd daemon is listening on {path} — start one with `inflightd serve`"
        )
        assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ real daemon
@pytest.mark.slow
def test_complete_streams_the_greedy_answer(daemon: Daemon) -> None:
    prompt = "The capital of France is"
    want = daemon.request("POST", "/v1/generate", {"prompt": prompt, "max_tokens": 8, "temperature": 0.0,
                                                  "stream": False}, kind="msgpack").msgpack()
    proc = _cli("complete", prompt, "--socket", daemon.socket_path, "--max-tokens", "8", "--stats")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want["text"]  # a pipe gets the text as is: no newline added
    n = want["usage"]["completion_tokens"]
    assert re.search(rf"finish {want['finish_reason']}: prompt \d+ tokens \(\d+ cached\), completion {n} tokens; "
                     r"queue [\d.]+ ms, ttft [\d.]+ ms, tpot [\d.]+ ms", proc.stderr), proc.stderr


@pytest.mark.slow
def test_complete_chat_and_stdin(daemon: Daemon) -> None:
    question = "What is the capital of France?"
    want = daemon.request("POST", "/v1/generate", {
        "messages": [{"role": "user", "content": question}], "max_tokens": 12, "temperature": 0.0, "stream": False,
    }, kind="msgpack").msgpack()
    proc = subprocess.run([INFLIGHTD, "complete", "-", "--chat", "--socket", daemon.socket_path, "--max-tokens", "12"],
                          input=question, capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want["text"] and "Paris" in proc.stdout


@pytest.mark.slow
def test_complete_reports_the_daemons_refusal(daemon: Daemon) -> None:
    proc = _cli("complete", "hello", "--socket", daemon.socket_path, "--max-tokens", "1000000")
    assert proc.returncode == 1
    assert proc.stderr.startswith("inflightd complete: ") and "max_model_len (2048)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.slow
def test_status(daemon: Daemon) -> None:
    proc = _cli("status", "--socket", daemon.socket_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("inflightd: ready — SmolLM2-135M-Instruct") and "on cpu (float32)" in out, out
    for row in (rf"pid\s+{daemon.proc.pid}\n", r"uptime\s+\S+", r"requests\s+\d+ running, \d+ queued",
                r"KV blocks\s+\d+ / \d+ used \([\d.]+ %\), 16 tokens each", r"prefix cache\s+[\d.]+ % of prompt",
                r"throughput\s+[\d.]+ tokens/s", rf"config file\s+{re.escape(str(daemon.config_path))}\n",
                r"last reload\s+", rf"socket\s+{re.escape(daemon.socket_path)}\n"):
        assert re.search(row, out), (row, out)

    proc = _cli("status", "--json", "--socket", daemon.socket_path)
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["state"] == "ready" and st["pid"] == daemon.proc.pid
    assert st["config_file"] == str(daemon.config_path) and st["kv_blocks_total"] > 0


@pytest.mark.slow
def test_reload(daemon: Daemon) -> None:
    original = daemon.config_path.read_text()
    proc = _cli("reload", "--socket", daemon.socket_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"reloaded {daemon.config_path}: no live key changed"
    try:
        daemon.config_path.write_text(original + "bogus_section: 1\n")
        proc = _cli("reload", "--socket", daemon.socket_path)
        assert proc.returncode == 1
        assert "unknown section 'bogus_section'" in proc.stderr and "previous config stays in force" in proc.stderr
        status = _cli("status", "--socket", daemon.socket_path).stdout
        assert re.search(r"last reload\s+failed at .*unknown section 'bogus_section'", status), status
    finally:
        # Other tests share this daemon: put the file back and make its reload the last one.
        daemon.config_path.write_text(original)
        restored = _cli("reload", "--json", "--socket", daemon.socket_path)
    assert restored.returncode == 0, restored.stderr
    r = json.loads(restored.stdout)
    assert r["ok"] and r["applied"] == [] and r["restart_required"] == [] and r["file"] == str(daemon.config_path)


# ---------------------------------------------------------------------------------- the API
@pytest.mark.slow
def test_api_errors_are_typed(daemon: Daemon) -> None:
    c = Client(daemon.socket_path)
    assert c.health() == {"status": "ok"}
    with pytest.raises(DaemonError) as info:
        list(c.generate_stream({"prompt": "hi", "max_tokenz": 3}))
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    assert "'max_tokenz': unknown key" in info.value.message


@pytest.mark.slow
def test_closing_a_stream_aborts_the_request(daemon: Daemon) -> None:
    c = Client(daemon.socket_path)
    frames = c.generate_stream({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0.0,
                                "ignore_eos": True})
    kinds = []
    for frame in frames:
        kinds.append(frame["type"])
        if frame["type"] == "delta":
            break
    assert c.status()["running"] == 1
    frames.close()
    deadline = time.monotonic() + 5  # 400 tokens would take tens of seconds on this CPU
    while c.status()["running"] != 0:
        assert time.monotonic() < deadline, "the daemon kept generating after the client went away"
        time.sleep(0.05)
    assert kinds == ["start", "delta"]
