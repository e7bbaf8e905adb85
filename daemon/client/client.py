"""The client side of the wire protocol: finding the daemon's socket, a small synchronous
HTTP/1.1 client over it, and incremental parsing of the native msgpack stream.

Used by `inflightd chat`, `complete`, `status` and `reload`, which must start instantly: stdlib
`http.client` over an AF_UNIX socket plus msgpack, nothing that imports torch or aiohttp.

Errors are typed so that each command can print one line instead of a traceback:
`DaemonUnavailable` (nothing listens on the socket), `DaemonError` (an HTTP error status, or an
`error` frame in a stream, with the daemon's own message) and `StreamError` (a stream the
protocol does not allow; `StreamTruncated` when it ends without a terminal frame).
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import msgpack

from ..server.config import SYSTEM_SOCKET, default_socket_path

MSGPACK_TYPE = "application/msgpack"
NATIVE_STREAM_TYPE = "application/vnd.inflightd.stream+msgpack"
# One frame is a few hundred bytes (a delta with logprobs a few KiB): a bound far above that
# keeps a misbehaving peer from growing the buffer without limit.
MAX_FRAME_BYTES = 4 << 20
READ_SIZE = 64 << 10


class ClientError(Exception):
    """Anything that stops a client command; the message is meant for the user."""


class DaemonUnavailable(ClientError):
    """No daemon answers on the socket (missing file, connection refused, no permission)."""

    def __init__(self, path: str, message: str | None = None) -> None:
        super().__init__(
            message or f"no inflightd daemon is listening on {path} — start one with `inflightd serve`"
        )
        self.path = path


class DaemonError(ClientError):
    """The daemon refused or failed a request: an HTTP error status with its
    `{"error": {"type", "message"}}` body, or an `error` frame inside a stream."""

    def __init__(self, status: int, type: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{message} (HTTP {status}, {type})")
        self.status = status
        self.type = type
        self.message = message
        self.retry_after = retry_after


class StreamError(ClientError):
    """The daemon's stream broke the protocol (not msgpack maps, a frame too large, …)."""


class StreamTruncated(StreamError):
    """The stream ended without its terminal `end` or `error` frame: the daemon died or the
    connection broke mid-answer."""


def resolve_socket_path(explicit: str | None = None) -> str:
    """--socket, then $INFLIGHTD_SOCKET, then the user's default; the system service's socket
    when the user's default does not exist and the system one does (`sudo systemctl start
    inflightd` should need no flag)."""
    if explicit:
        return explicit
    env = os.environ.get("INFLIGHTD_SOCKET")
    if env:
        return env
    default = default_socket_path()
    if not os.path.exists(default) and os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    return default


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self.unix_path)
        except BaseException:
            s.close()
            raise
        self.sock = s


def parse_frames(chunks: Iterable[bytes], max_buffer_size: int = MAX_FRAME_BYTES) -> Iterator[dict[str, Any]]:
    """The native stream's frames, from byte chunks cut anywhere (HTTP chunks do not keep frame
    boundaries). Yields `start`, `delta` and finally `end` frames; an `error` frame raises
    `DaemonError`; the end of the bytes without a terminal frame raises `StreamTruncated`."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max_buffer_size)
    frames = 0
    for chunk in chunks:
        try:
            unpacker.feed(chunk)
        except msgpack.BufferFull:
            raise StreamError(f"a stream frame is larger than {max_buffer_size} bytes") from None
        try:
            for frame in unpacker:
                kind = frame.get("type") if isinstance(frame, dict) else None
                if kind is None:
                    raise StreamError(f"frame {frames}: expected a map with a 'type', got {frame!r:.80}")
                frames += 1
                if kind == "error":
                    status = frame.get("status")
                    raise DaemonError(status if isinstance(status, int) else 500, "stream_error",
                                      str(frame.get("message", "unknown error")))
                yield frame
                if kind == "end":
                    return
        except (msgpack.UnpackValueError, msgpack.ExtraData, ValueError) as e:
            raise StreamError(f"the stream is not valid msgpack after {frames} frames: {e}") from None
    raise StreamTruncated(f"the stream ended after {frames} frames without an end frame (truncated: "
                          "did the daemon stop or crash?)")


def _error_from_body(status: int, body: bytes, content_type: str, retry_after: str | None) -> DaemonError:
    obj: Any = None
    try:
        if content_type.startswith(MSGPACK_TYPE):
            obj = msgpack.unpackb(body, raw=False)
        elif body:
            obj = json.loads(body)
    except Exception:  # msgpack and json raise several unrelated types for bad input
        obj = None
    err = obj.get("error") if isinstance(obj, dict) else None
    try:
        after = float(retry_after) if retry_after is not None else None
    except ValueError:
        after = None
    if isinstance(err, dict):
        return DaemonError(status, str(err.get("type", "error")), str(err.get("message", "")), after)
    text = body.decode("utf-8", errors="replace").strip()[:200]
    return DaemonError(status, "error", text or http.client.responses.get(status, "error"), after)


class Client:
    """One short HTTP/1.1 connection per call (the daemon aborts a generation when its connection
    closes, so a stream owns its connection)."""

    def __init__(self, socket_path: str | None = None, timeout: float | None = 60.0,
                 stream_timeout: float | None = None) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.timeout = timeout
        # None: wait as long as the daemon does (limits.request_timeout_s ends a stuck request)
        self.stream_timeout = stream_timeout

    # ------------------------------------------------------------------------------ transport
    def _open(self, method: str, path: str, body: bytes | None, content_type: str | None,
              timeout: float | None) -> tuple[_UnixHTTPConnection, http.client.HTTPResponse]:
        conn = _UnixHTTPConnection(self.socket_path, timeout)
        headers = {"Content-Type": content_type} if content_type else {}
        try:
            conn.request(method, path, body=body, headers=headers)
            return conn, conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            conn.close()
            raise DaemonUnavailable(self.socket_path) from None
        except PermissionError:
            conn.close()
            raise DaemonUnavailable(
                self.socket_path,
                f"permission denied on {self.socket_path}: your user needs to be in the socket's group "
                "(or listed in listen.allow_uids)",
            ) from None
        except (http.client.HTTPException, ConnectionError) as e:
            # Accepted, then closed before an answer: e.g. a daemon stopping right now.
            conn.close()
            raise DaemonUnavailable(self.socket_path, f"the daemon on {self.socket_path} closed the connection "
                                    f"without answering ({e.__class__.__name__})") from None
        except OSError as e:
            conn.close()
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
                raise DaemonUnavailable(self.socket_path) from None
            raise DaemonUnavailable(self.socket_path, f"cannot reach the daemon on {self.socket_path}: "
                                    f"{e.strerror or e}") from None
        except BaseException:
            conn.close()
            raise

    def _json(self, method: str, path: str, ok: Iterable[int] = (200,)) -> tuple[int, Any]:
        conn, resp = self._open(method, path, None, None, self.timeout)
        try:
            body = resp.read()
        finally:
            conn.close()
        if resp.status not in tuple(ok):
            raise _error_from_body(resp.status, body, resp.getheader("Content-Type", ""),
                                   resp.getheader("Retry-After"))
        try:
            return resp.status, json.loads(body)
        except ValueError as e:
            raise StreamError(f"{method} {path}: the answer is not JSON: {e}") from None

    # ----------------------------------------------------------------------------------- API
    def generate_stream(self, body: dict[str, Any]) -> Generator[dict[str, Any], None, None]:
        """POST /v1/generate (streamed) and yield its frames as they arrive: `start`, `delta`…,
        `end`. Raises `DaemonError` for an HTTP error or an `error` frame, `StreamTruncated`
        when the stream breaks off. Closing the generator early closes the connection, which
        aborts the request in the daemon."""
        payload = msgpack.packb({**body, "stream": True})
        conn, resp = self._open("POST", "/v1/generate", payload, MSGPACK_TYPE, self.stream_timeout)
        try:
            if resp.status != 200:
                raise _error_from_body(resp.status, resp.read(), resp.getheader("Content-Type", ""),
                                       resp.getheader("Retry-After"))
            ctype = resp.getheader("Content-Type", "")
            if not ctype.startswith(NATIVE_STREAM_TYPE):
                raise StreamError(f"expected a {NATIVE_STREAM_TYPE} stream, got {ctype or 'no Content-Type'}")
            yield from parse_frames(_read_chunks(resp.read1))
        finally:
            conn.close()

    def status(self) -> dict[str, Any]:
        """GET /v1/status."""
        return dict(self._json("GET", "/v1/status")[1])

    def reload(self) -> dict[str, Any]:
        """POST /v1/reload: `{ok, time, file, error, applied, restart_required}`, also when the
        file was invalid (HTTP 400, `ok` false): the answer says what happened either way."""
        status, obj = self._json("POST", "/v1/reload", ok=(200, 400))
        if not isinstance(obj, dict) or "ok" not in obj:
            raise DaemonError(status, "error", f"unexpected reload answer: {obj!r:.200}")
        return obj

    def health(self) -> dict[str, Any]:
        """GET /health: `{"status": "ok"}` when ready, else the state (loading, draining), which
        is an answer, not an error."""
        return dict(self._json("GET", "/health", ok=(200, 503))[1])


def _read_chunks(read1: Callable[[int], bytes]) -> Iterator[bytes]:
    while True:
        try:
            chunk = read1(READ_SIZE)
        except (http.client.HTTPException, ConnectionError) as e:
            raise StreamTruncated(f"the connection broke mid-stream ({e.__class__.__name__}: {e}); the answer "
                                  "is truncated") from None
        except TimeoutError:
            raise StreamTruncated("no data from the daemon within the timeout; the answer is truncated") from None
        if not chunk:
            return
        yield chunk
