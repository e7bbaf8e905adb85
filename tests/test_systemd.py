"""systemd integration without systemd as PID 1.

- `inflightd.server.systemd`: notifications received on a datagram socket of our own passed as
  `NOTIFY_SOCKET` (path and abstract), the watchdog interval, and socket activation in a child
  process that gets a pre-bound listening socket on fd 3 with `LISTEN_PID` set to its own pid.
- The unit files: `systemd-analyze verify` must print nothing, `systemd-analyze security
  --offline` must rate the service at most 2.0, and the sysusers/tmpfiles snippets must do what
  they say in a scratch root.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from inflightd.server import systemd

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"

# ---------------------------------------------------------------------------------------------
# Notifications


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A datagram socket standing in for systemd's notify socket, and the environ pointing at it."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock, {"NOTIFY_SOCKET": str(path)}
    finally:
        sock.close()


def _recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def _assert_nothing_pending(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_lifecycle_datagrams(receiver: tuple[socket.socket, dict[str, str]]) -> None:
    sock, environ = receiver
    with systemd.Notifier(environ) as n:
        assert n.enabled
        n.ready("loading done")
        assert _recv(sock) == ["READY=1", "STATUS=loading done"]

        before = time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6
        n.reloading()
        after = time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6
        reload_msg = _recv(sock)
        assert reload_msg[0] == "RELOADING=1"  # one datagram carrying both, as notify-reload needs
        assert len(reload_msg) == 2 and reload_msg[1].startswith("MONOTONIC_USEC=")
        usec = int(reload_msg[1].removeprefix("MONOTONIC_USEC="))
        assert before - 1 <= usec <= after + 1

        n.ready()
        assert _recv(sock) == ["READY=1"]
        n.status("line one\nline two\r\nthree")
        assert _recv(sock) == ["STATUS=line one line two three"]
        n.watchdog()
        assert _recv(sock) == ["WATCHDOG=1"]
        n.extend_timeout(1.5)
        assert _recv(sock) == ["EXTEND_TIMEOUT_USEC=1500000"]
        n.stopping("draining 2 requests")
        assert _recv(sock) == ["STOPPING=1", "STATUS=draining 2 requests"]
    assert not n.enabled
    n.ready()  # after close: a no-op, not an error
    _assert_nothing_pending(sock)


def test_notify_function(receiver: tuple[socket.socket, dict[str, str]]) -> None:
    sock, environ = receiver
    assert systemd.notify("READY=1", "STATUS=up", environ=environ) is True
    assert _recv(sock) == ["READY=1", "STATUS=up"]


def test_abstract_socket() -> None:
    name = f"inflightd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        environ = {"NOTIFY_SOCKET": "@" + name}
        assert systemd.notify("WATCHDOG=1", environ=environ)
        assert _recv(sock) == ["WATCHDOG=1"]
        with systemd.Notifier(environ) as n:
            n.ready()
            assert _recv(sock) == ["READY=1"]


def test_unset_is_a_no_op() -> None:
    assert systemd.notify("READY=1", environ={}) is False
    n = systemd.Notifier({})
    assert not n.enabled
    n.ready("x")
    n.reloading()
    n.status("x")
    n.watchdog()
    n.stopping()
    assert n.watchdog_interval() is None
    n.close()


def test_send_errors_never_raise_and_warn_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    environ = {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}
    caplog.set_level(logging.DEBUG, logger="inflightd.server.systemd")
    with systemd.Notifier(environ) as n:
        assert n.enabled
        for _ in range(3):
            n.watchdog()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "nobody-listens" in warnings[0].getMessage()
    assert systemd.notify("READY=1", environ=environ) is False


def test_watchdog_interval(receiver: tuple[socket.socket, dict[str, str]]) -> None:
    _, environ = receiver

    def interval(**extra: str) -> float | None:
        with systemd.Notifier({**environ, **extra}) as n:
            return n.watchdog_interval()

    assert interval() is None
    assert interval(WATCHDOG_USEC="60000000") == 30.0
    assert interval(WATCHDOG_USEC="60000000", WATCHDOG_PID=str(os.getpid())) == 30.0
    assert interval(WATCHDOG_USEC="60000000", WATCHDOG_PID=str(os.getpid() + 1)) is None
    assert interval(WATCHDOG_USEC="0") is None
    assert interval(WATCHDOG_USEC="soon") is None
    # Without a socket to ping, there is no point in a ping timer.
    assert systemd.Notifier({"WATCHDOG_USEC": "60000000"}).watchdog_interval() is None


# ---------------------------------------------------------------------------------------------
# Socket activation


def test_listen_fds_for_another_pid() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert systemd.listen_fds(dict(environ), unset=False) == []
    kept = dict(environ)
    systemd.listen_fds(kept, unset=False)
    assert kept == environ
    cleared = dict(environ)
    assert systemd.listen_fds(cleared) == []
    assert cleared == {}  # as sd_listen_fds(unset_environment=1): cleared whatever the outcome
    assert systemd.listen_fds({}) == []


# Runs as the activated daemon: takes the sockets, reports what it got, serves one connection.
_CHILD = r"""
import json, os, socket, sys
from inflightd.server import systemd
pairs = systemd.listen_fds_with_names()
name, sock = pairs[0]
report = {
    "count": len(pairs),
    "name": name,
    "fd": sock.fileno(),
    "family": int(sock.family),
    "type": int(sock.type),
    "inheritable": os.get_inheritable(sock.fileno()),
    "env_left": sorted(k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ),
    "second_call": len(systemd.listen_fds()),
}
conn, _ = sock.accept()
conn.sendall(conn.recv(64).upper())
conn.close()
print(json.dumps(report))
"""

# What systemd does before exec'ing the daemon: the socket on fd 3, LISTEN_PID = the pid that
# will run the daemon. exec keeps the pid, so a small launcher can set LISTEN_PID to its own pid
# and then exec the daemon (the shell idiom `LISTEN_PID=$$ exec ...`; Python here, because
# POSIX sh cannot redirect a descriptor numbered above 9 onto fd 3).
_LAUNCHER = r"""
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)  # inheritable, like the fds systemd passes
os.close(fd)
env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="inflightd")
os.execve(sys.executable, [sys.executable, "-c", sys.argv[2]], env)
"""


def test_socket_activation_in_child(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    try:
        fd = listener.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(fd), _CHILD],
            pass_fds=(fd,),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        listener.close()  # only the child holds the listening socket now
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(20)
        client.connect(str(path))  # queues in the backlog until the child accepts
        client.sendall(b"ping")
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert client.recv(64) == b"PING"
    report = json.loads(out)
    assert report == {
        "count": 1,
        "name": "inflightd",
        "fd": 3,
        "family": int(socket.AF_UNIX),
        "type": int(socket.SOCK_STREAM),
        "inheritable": False,  # close-on-exec, as sd_listen_fds sets it
        "env_left": [],
        "second_call": 0,
    }


# ---------------------------------------------------------------------------------------------
# Unit files


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return exe


def _systemd_version(analyze: str) -> int:
    first = subprocess.run([analyze, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.match(r"systemd (\d+)", first)
    assert m, first
    return int(m.group(1))


@pytest.fixture
def unit_dir(tmp_path: Path) -> tuple[Path, int, str]:
    """The units as a packager installs them for the systemd at hand, in a scratch directory.

    On systemd < 253 the drop-in that replaces Type=notify-reload comes along. `verify` checks
    that ExecStart='s binary exists, and /usr/bin/inflightd is not there in a development
    checkout: the copy names the `inflightd` console script of the interpreter running the tests
    instead (the same entry point a package installs as /usr/bin/inflightd). That is the only
    change made to the files.
    """
    analyze = _analyze()
    version = _systemd_version(analyze)
    script = Path(sys.executable).parent / "inflightd"
    found = str(script) if script.is_file() else shutil.which("inflightd")
    assert found, "the inflightd console script is not installed (pip install -e .)"
    d = tmp_path / "units"
    d.mkdir()
    service = (UNITS / "inflightd.service").read_text()
    assert "ExecStart=/usr/bin/inflightd " in service
    (d / "inflightd.service").write_text(service.replace("ExecStart=/usr/bin/inflightd ", f"ExecStart={found} "))
    shutil.copy(UNITS / "inflightd.socket", d / "inflightd.socket")
    if version < 253:
        shutil.copytree(UNITS / "inflightd.service.d", d / "inflightd.service.d")
    return d, version, analyze


def _parse_warning_lines(d: Path, version: int) -> set[str]:
    """What systemd < 253 says, unavoidably, about the main unit: the drop-in overrides the value
    but cannot stop the main file's line from being parsed. Nothing else is accepted."""
    if version >= 253:
        return set()
    lines = (d / "inflightd.service").read_text().splitlines()
    n = lines.index("Type=notify-reload") + 1
    return {f"{d / 'inflightd.service'}:{n}: Failed to parse service type, ignoring: notify-reload"}


def test_units_verify_clean(unit_dir: tuple[Path, int, str]) -> None:
    d, version, analyze = unit_dir
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="info", SYSTEMD_LOG_COLOR="0")
    proc = subprocess.run(
        [analyze, "verify", str(d / "inflightd.service"), str(d / "inflightd.socket")],
        capture_output=True, text=True, env=env, cwd=d,
    )
    output = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 0, output
    expected = _parse_warning_lines(d, version)
    assert set(output) == expected, "\n".join(output)


def test_drop_in_applies_before_253(unit_dir: tuple[Path, int, str]) -> None:
    d, version, analyze = unit_dir
    if version >= 253:
        pytest.skip(f"systemd {version} knows Type=notify-reload; the drop-in is not installed")
    # At debug level verify dumps the loaded unit: the drop-in must have set the type and reload.
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="debug", SYSTEMD_LOG_COLOR="0")
    proc = subprocess.run(
        [analyze, "verify", str(d / "inflightd.service")], capture_output=True, text=True, env=env, cwd=d
    )
    dump = proc.stdout + proc.stderr
    assert re.search(r"^\s*Type: notify$", dump, re.M), dump
    assert "/bin/kill -HUP" in dump, dump


def test_service_security_exposure(unit_dir: tuple[Path, int, str]) -> None:
    d, _, analyze = unit_dir
    proc = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", "--no-pager", str(d / "inflightd.service")],
        capture_output=True, text=True, cwd=d,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"Overall exposure level for inflightd\.service: (\d+(?:\.\d+)?)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 2.0, proc.stdout


def test_socket_unit_contract() -> None:
    """The values clients and the service rely on (verify cannot tell a wrong mode from a right one)."""
    sock = (UNITS / "inflightd.socket").read_text().splitlines()
    for line in ("ListenStream=/run/inflightd/inflightd.sock", "SocketMode=0660", "SocketGroup=inflightd"):
        assert line in sock
    service = (UNITS / "inflightd.service").read_text().splitlines()
    assert not [line for line in service if line.startswith("RuntimeDirectory")]
    for line in ("Type=notify-reload", "MemoryDenyWriteExecute=no", "PrivateDevices=no", "UMask=0077"):
        assert line in service


def test_sysusers_creates_socket_group(tmp_path: Path) -> None:
    exe = shutil.which("systemd-sysusers")
    if exe is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    proc = subprocess.run(
        [exe, f"--root={tmp_path}", str(UNITS / "inflightd.sysusers")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    groups = (tmp_path / "etc" / "group").read_text().splitlines()
    assert any(g.startswith("inflightd:x:") for g in groups), groups


def test_tmpfiles_seeds_config(tmp_path: Path) -> None:
    exe = shutil.which("systemd-tmpfiles")
    if exe is None:
        pytest.skip("systemd-tmpfiles is not installed")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles chowns to root: needs root")
    packaged = tmp_path / "usr/share/inflightd/inflightd.yaml"
    packaged.parent.mkdir(parents=True)
    packaged.write_text("log: {level: info}\n")
    proc = subprocess.run(
        [exe, f"--root={tmp_path}", "--create", str(UNITS / "inflightd.tmpfiles")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    etc = tmp_path / "etc/inflightd"
    assert etc.is_dir() and (etc.stat().st_mode & 0o777) == 0o755
    assert (etc / "inflightd.yaml").read_text() == packaged.read_text()
