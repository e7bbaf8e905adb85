"""Shared fixtures. The default model must have been pulled (`inflightd pull`, as .ci/run does):
a missing model is a failure with the command to run, never a silent skip."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _store() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "inflightd" / "models"


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    path = Path(os.environ.get("INFLIGHTD_TEST_MODEL", _store() / DEFAULT_GGUF_NAME))
    if not path.is_file():
        pytest.fail(f"default model not found at {path}: run `inflightd pull` first")
    return path


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path):  # noqa: ANN201
    """One real `inflightd serve` (default model, float32, CPU) shared by the protocol tests."""
    from daemon_util import start_daemon

    d = start_daemon(tmp_path_factory.mktemp("daemon"))
    yield d
    rc = d.stop()
    assert rc == 0, f"daemon exited {rc}; log:\n{d.log()}"


# Fixtures that load the default model (directly, or through a daemon that does).
_MODEL_FIXTURES = frozenset({"default_gguf", "daemon"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """setup.cfg's rule, kept: a test that loads the default model is marked `slow`, so that
    `-m "not slow"` is a quick run that needs no model."""
    unmarked = [item.nodeid for item in items
                if _MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("tests that load the default model must be marked slow:\n  " + "\n  ".join(unmarked))
