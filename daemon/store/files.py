"""Writing into the model store: atomically (a temporary file in the target folder, fsync'ed
and renamed, the folder fsync'ed), with progress on a terminal. Pure Python."""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import IO, TextIO

from .store import _CHUNK, SYSTEM_STORE, PullError

# ---------------------------------------------------------------------------------------------
# Progress


def fmt_bytes(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"


class Progress:
    """bytes/total on one line that rewrites itself on a tty; a line per 10 % otherwise."""

    def __init__(self, stream: TextIO | None, label: str, total: int) -> None:
        self._stream = stream
        self._label = label
        self._total = max(total, 1)
        self._done = 0
        isatty = getattr(stream, "isatty", None)
        self._tty = bool(isatty and isatty())
        self._last_draw = 0.0
        self._last_decile = -1

    def advance(self, n: int) -> None:
        self._done += n
        if self._stream is None:
            return
        if self._tty:
            now = time.monotonic()
            # Redrawing on every 1 MiB chunk would flood a slow terminal.
            if now - self._last_draw >= 0.1:
                self._last_draw = now
                self._stream.write(f"\r{self._line()}")
                self._stream.flush()
        else:
            decile = min(10, self._done * 10 // self._total)
            if decile > self._last_decile and decile < 10:
                self._last_decile = decile
                self._stream.write(self._line() + "\n")
                self._stream.flush()

    def finish(self) -> None:
        if self._stream is None:
            return
        self._stream.write(("\r" if self._tty else "") + self._line() + "\n")
        self._stream.flush()

    def _line(self) -> str:
        pct = self._done * 100 // self._total
        return f"{self._label}: {fmt_bytes(self._done)} / {fmt_bytes(self._total)} ({pct}%)"


def say(progress: TextIO | None, message: str) -> None:
    if progress is not None:
        progress.write(message + "\n")
        progress.flush()


# ---------------------------------------------------------------------------------------------
# Writing into the store atomically


def ensure_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        hint = " (the system store needs root: sudo)" if path == SYSTEM_STORE else ""
        raise PullError(f"cannot create {path}: {e.strerror or e}{hint}") from e


def fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse O_RDONLY dirs, which is harmless.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class TempFile:
    """A hidden temp file in the destination's folder: written, hashed, then renamed or removed."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        try:
            fd, name = tempfile.mkstemp(
                prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent
            )
        except OSError as e:
            raise PullError(f"cannot write into {dest.parent}: {e.strerror or e}") from e
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def copy_from(self, src: IO[bytes], bar: Progress) -> None:
        while chunk := src.read(_CHUNK):
            self._file.write(chunk)
            self.sha256.update(chunk)
            self.size += len(chunk)
            bar.advance(len(chunk))
        bar.finish()

    def commit(self) -> Path:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self.path, 0o644)  # mkstemp makes 0600; the service user must read it
        os.replace(self.path, self.dest)
        fsync_dir(self.dest.parent)
        return self.dest

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)
