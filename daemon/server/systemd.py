"""systemd integration without libsystemd: the sd_notify protocol and socket activation.

This module owns exactly two things, both plain Python over the kernel:

- **Notifications** (`sd_notify(3)`): `Notifier` keeps one `AF_UNIX`/`SOCK_DGRAM` socket towards
  `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`) and sends
  `READY=1`, `RELOADING=1` + `MONOTONIC_USEC=` (what `Type=notify-reload` requires), `STOPPING=1`,
  `STATUS=`, `WATCHDOG=1` and `EXTEND_TIMEOUT_USEC=`. `watchdog_interval()` turns
  `$WATCHDOG_USEC`/`$WATCHDOG_PID` into how often to ping. Sending never raises: without systemd
  (or with a dead socket) a notification is a no-op, logged once.
- **Socket activation** (`sd_listen_fds(3)`): `listen_fds()` returns the sockets systemd passed
  from fd 3 on, when `$LISTEN_PID` names this process, and clears the variables so that children
  do not take them for their own.

What to send when (a reload, a watchdog ping only while the step loop progresses) is the server's
business; this module only speaks the protocol. It imports nothing from the rest of the package.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, MutableMapping

__all__ = ["LISTEN_FDS_START", "Notifier", "listen_fds", "listen_fds_with_names", "notify"]

log = logging.getLogger(__name__)

#: The first file descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3

_ACTIVATION_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _address(value: str | None) -> str | None:
    """The `sendto` address for a `$NOTIFY_SOCKET` value, or None when there is none to use.

    systemd writes abstract-namespace sockets with a leading `@`; Python wants a leading NUL.
    Other forms (`vsock:`, used by VMs since systemd 253) are not supported and are logged.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket: not notifying systemd", value)
    return None


def _open_socket() -> socket.socket:
    # Non-blocking: a wedged manager must never stall the event loop or the step loop; a datagram
    # that does not fit is dropped (and logged) instead.
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)


def _payload(lines: tuple[str, ...]) -> bytes:
    return "\n".join(lines).encode("utf-8")


_notify_warned = False


def notify(*lines: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `lines` (e.g. `"READY=1"`, `"STATUS=..."`) to `$NOTIFY_SOCKET` as one datagram.

    Returns True when the datagram was sent, False when `$NOTIFY_SOCKET` is unset (not running
    under systemd, or a Type= that does not listen) or the send failed. Never raises on a send
    error: the first failure is logged as a warning, later ones at debug level. Opens a socket per
    call; a long-lived process that notifies repeatedly should keep a `Notifier`.
    """
    global _notify_warned
    env = os.environ if environ is None else environ
    address = _address(env.get("NOTIFY_SOCKET"))
    if address is None:
        return False
    try:
        with _open_socket() as sock:
            sock.sendto(_payload(lines), socket.MSG_NOSIGNAL, address)
    except OSError as e:
        level = logging.DEBUG if _notify_warned else logging.WARNING
        _notify_warned = True
        log.log(level, "cannot notify systemd at %s: %s", env.get("NOTIFY_SOCKET"), e)
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would end the STATUS= assignment and start a bogus one.
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


class Notifier:
    """One connection-less channel to the service manager, read from the environment once.

    Safe to call from any thread (each call is one `sendto`). All methods are no-ops when
    `$NOTIFY_SOCKET` is unset or after `close()`. systemd accepts messages only from the main
    process by default (`NotifyAccess=main`): call these from the daemon's own process, not from
    a worker process it spawns.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._name = env.get("NOTIFY_SOCKET", "")
        self._address = _address(self._name)
        self._watchdog_usec = self._parse_watchdog(env)
        self._lock = threading.Lock()
        self._warned = False
        self._sock: socket.socket | None = None
        if self._address is not None:
            try:
                self._sock = _open_socket()
            except OSError as e:  # out of fds at startup: run without systemd rather than die
                log.warning("cannot open a socket to notify systemd: %s", e)
                self._address = None

    @staticmethod
    def _parse_watchdog(env: Mapping[str, str]) -> int | None:
        """`$WATCHDOG_USEC` in µs when the watchdog is meant for this process, else None."""
        raw = env.get("WATCHDOG_USEC")
        if not raw:
            return None
        try:
            usec = int(raw)
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw)
            return None
        if usec <= 0:
            return None
        pid = env.get("WATCHDOG_PID")
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None  # set for another process (we were forked or exec'd by it)
            except ValueError:
                log.warning("ignoring WATCHDOG_PID=%r: not an integer", pid)
                return None
        return usec

    @property
    def enabled(self) -> bool:
        """True while there is a `$NOTIFY_SOCKET` to send to and `close()` was not called."""
        return self._sock is not None

    def _send(self, *lines: str) -> bool:
        sock = self._sock
        if sock is None or self._address is None:
            return False
        try:
            sock.sendto(_payload(lines), socket.MSG_NOSIGNAL, self._address)
        except OSError as e:
            with self._lock:
                level = logging.DEBUG if self._warned else logging.WARNING
                self._warned = True
            log.log(level, "cannot notify systemd at %s: %s", self._name, e)
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        """`READY=1`: startup (or a reload) finished; with `STATUS=` in the same datagram."""
        lines = ["READY=1"]
        if status is not None:
            lines.append("STATUS=" + _one_line(status))
        self._send(*lines)

    def reloading(self, status: str | None = None) -> None:
        """`RELOADING=1` + `MONOTONIC_USEC=now` in one datagram, as `Type=notify-reload` requires.

        Send it as the first thing on SIGHUP, and `ready()` once the reload is done (also when
        the new config was rejected: the old one is still in force and the daemon is ready).
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lines = ["RELOADING=1", f"MONOTONIC_USEC={usec}"]
        if status is not None:
            lines.append("STATUS=" + _one_line(status))
        self._send(*lines)

    def stopping(self, status: str | None = None) -> None:
        """`STOPPING=1`: shutdown (draining) has begun."""
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append("STATUS=" + _one_line(status))
        self._send(*lines)

    def status(self, text: str) -> None:
        """`STATUS=text`, shown by `systemctl status`; newlines become spaces."""
        self._send("STATUS=" + _one_line(text))

    def watchdog(self) -> None:
        """`WATCHDOG=1`: the daemon is alive. Ping only when the work loop has shown progress."""
        self._send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """`EXTEND_TIMEOUT_USEC=`: ask for `seconds` more before the start/stop/reload timeout fires.

        For slow but progressing phases (a cold Numba compile, a long drain); each call restarts
        the extension, so repeat it while the phase lasts. Ignored by systemd < 236.
        """
        self._send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1e6))}")

    def watchdog_interval(self) -> float | None:
        """Seconds between `WATCHDOG=1` pings: half of `$WATCHDOG_USEC`, as sd_watchdog_enabled(3)
        recommends. None when no watchdog is configured, when `$WATCHDOG_PID` names another
        process, or when there is no `$NOTIFY_SOCKET` to ping."""
        if self._watchdog_usec is None or self._address is None:
            return None
        return self._watchdog_usec / 2 / 1e6

    def close(self) -> None:
        """Close the socket; later calls send nothing."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def listen_fds_with_names(
    environ: MutableMapping[str, str] | None = None, *, unset: bool = True
) -> list[tuple[str, socket.socket]]:
    """Like `listen_fds`, with each socket's `FileDescriptorName=` (`"unknown"` when not given)."""
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    pid_text = env.get("LISTEN_PID")
    count_text = env.get("LISTEN_FDS")
    names_text = env.get("LISTEN_FDNAMES")
    if unset:
        # As sd_listen_fds(unset_environment=1): cleared whatever the outcome, so that no child
        # process (and no second call) mistakes these descriptors for its own.
        for name in _ACTIVATION_VARS:
            env.pop(name, None)
    if not pid_text or not count_text:
        return []
    try:
        pid, count = int(pid_text), int(count_text)
    except ValueError:
        log.warning("ignoring socket activation: LISTEN_PID=%r LISTEN_FDS=%r", pid_text, count_text)
        return []
    if pid != os.getpid():
        return []  # meant for the process that exec'd us, or for a parent we forked from
    if count <= 0:
        return []
    names = names_text.split(":") if names_text else []
    if len(names) != count:
        names = ["unknown"] * count
    result: list[tuple[str, socket.socket]] = []
    for fd, name in zip(range(LISTEN_FDS_START, LISTEN_FDS_START + count), names):
        try:
            os.set_inheritable(fd, False)  # FD_CLOEXEC, as sd_listen_fds sets it
            sock = socket.socket(fileno=fd)  # family, type and protocol read from the fd
        except OSError as e:
            log.warning("ignoring passed fd %d (%s): %s", fd, name, e)
            continue
        result.append((name, sock))
    return result


def listen_fds(environ: MutableMapping[str, str] | None = None, *, unset: bool = True) -> list[socket.socket]:
    """The sockets systemd passed by socket activation, in `ListenStream=` order; [] if none.

    They are fds 3 .. 3+$LISTEN_FDS-1, and ours only when `$LISTEN_PID` is this process's pid.
    Each is returned as a `socket.socket` (close-on-exec set) in whatever blocking mode systemd
    left it. With `unset=True` (default) `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` are
    removed from `environ` (default `os.environ`) in every case, as `sd_listen_fds(1)` does.
    A descriptor that is not a socket is logged and skipped.
    """
    return [sock for _, sock in listen_fds_with_names(environ, unset=unset)]
