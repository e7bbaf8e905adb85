"""Listening sockets and who may use them.

Safe bind: asyncio's `create_unix_server` unlinks whatever file is at the path, so a second
daemon would silently steal a live socket. We connect first: a daemon that answers keeps its
socket and we refuse to start; only a stale file (connection refused) is removed. The socket
is bound under a umask that yields the configured mode at once (no window in which it is more
open than asked), before any thread exists (umask is per process).

Peer credentials: each connection's `SO_PEERCRED` (pid, uid, gid) is checked against an
allow-list: the daemon's own uid, root, `listen.allow_uids`, and members (primary or
supplementary group) of the socket file's group and `listen.allow_groups`.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass

log = logging.getLogger(__name__)


class SocketInUseError(RuntimeError):
    """A live daemon answers on the path."""


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def bind_unix(path: str, mode: int) -> socket.socket:
    """A listening Unix socket at `path` with permissions `mode`; raises SocketInUseError when
    a daemon already answers there."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, mode=0o755, exist_ok=True)
    # A folder someone else owns (e.g. a pre-created /tmp/inflightd-UID when XDG_RUNTIME_DIR is
    # unset) would let them swap the socket under our clients.
    owner = os.stat(parent).st_uid
    if owner not in (0, os.geteuid()):
        raise SocketInUseError(f"{parent} belongs to uid {owner}, not to this user: refusing to put the socket there")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUseError(f"{path} exists and is not a socket: refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise SocketInUseError(f"{path}: cannot tell whether a daemon is there ({e.strerror})") from None
            log.info("removing stale socket %s", path)
            os.unlink(path)
        else:
            raise SocketInUseError(f"another daemon is serving on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def peer_cred(sock: object) -> PeerCred | None:
    """SO_PEERCRED of a connected Unix socket (None for TCP or when unavailable)."""
    getsockopt = getattr(sock, "getsockopt", None)
    family = getattr(sock, "family", None)
    if getsockopt is None or family != socket.AF_UNIX:
        return None
    try:
        raw = getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def peer_groups(pid: int) -> set[int]:
    """Supplementary groups of a process (from /proc; empty when it is gone or hidden)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


class AllowList:
    def __init__(self, uids: set[int], gids: set[int]) -> None:
        self.uids = uids
        self.gids = gids

    @classmethod
    def build(
        cls, socket_path: str | None, allow_uids: tuple[int, ...], allow_groups: tuple[str | int, ...]
    ) -> AllowList:
        uids = {0, os.getuid(), os.geteuid(), *allow_uids}
        gids: set[int] = set()
        if socket_path is not None:
            try:
                gids.add(os.stat(socket_path).st_gid)
            except OSError:
                pass
        for g in allow_groups:
            if isinstance(g, int):
                gids.add(g)
            else:
                try:
                    gids.add(grp.getgrnam(g).gr_gid)
                except KeyError:
                    log.warning("listen.allow_groups: no group named %r", g)
        return cls(uids, gids)

    def allows(self, cred: PeerCred) -> bool:
        if cred.uid in self.uids or cred.gid in self.gids:
            return True
        return bool(self.gids & peer_groups(cred.pid))


def file_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def unlink_if_ours(path: str, identity: tuple[int, int] | None) -> None:
    """Remove the socket file at shutdown, unless another daemon has replaced it meanwhile
    (`identity`: `file_identity(path)` right after binding)."""
    if identity is not None and file_identity(path) == identity:
        try:
            os.unlink(path)
        except OSError:
            pass
