"""The layering ARCHITECTURE.md describes, kept by tests: which package may import which (read
from the source, module-level imports), that the HTTP layer and the client commands load no
torch, that the daemon answers /health with "loading" while the model loads, and that the tree
listing in ARCHITECTURE.md is the tree."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_util import UnixHTTPConnection, start_daemon

ROOT = Path(__file__).resolve().parent.parent
DAEMON = ROOT / "daemon"

# What each part of the package may import at module level (besides the standard library and
# third-party packages other than those named in FORBIDDEN_THIRD_PARTY). "inflightd" alone
# stands for the package's top-level modules (checks, cli, llm).
ALLOWED: dict[str, set[str]] = {
    "checks": set(),
    "models": {"models", "checks", "numba_kernels"},
    "tokenizer": {"tokenizer", "models.gguf_file", "checks"},
    "engine": {"engine", "tokenizer", "checks"},
    "runtime": {"runtime", "engine", "models", "checks", "numba_kernels"},
    "server": {"server", "engine", "tokenizer", "runtime.settings", "models.cpu_settings", "checks"},
    "store": {"store"},
    "client": {"client", "server.config", "engine.sampling_params", "checks"},
    "llm": {"engine", "runtime", "models", "tokenizer", "store", "checks", "numba_kernels"},
    "cli": {"client", "store", "server.daemon"},
    "__init__": {"runtime.settings", "engine.sampling_params", "llm"},
    "__main__": {"cli"},
}
FORBIDDEN_THIRD_PARTY = {
    # the engine and the tokenizer know nothing of HTTP; only the server speaks it
    "engine": {"aiohttp"}, "tokenizer": {"aiohttp"}, "runtime": {"aiohttp"}, "models": {"aiohttp"},
    # the server, the client and the store never load torch (nor Numba, which is as slow)
    "server": {"torch", "numba", "numba_kernels"}, "client": {"torch", "numba", "aiohttp"},
    "store": {"torch", "numba", "aiohttp"},
}


def _part(module: str) -> str:
    """inflightd.engine.scheduler → engine; inflightd.llm → llm; inflightd → __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(DAEMON).with_suffix("")
    parts = ["inflightd", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Absolute names imported at module level (not under `if TYPE_CHECKING:`, not in functions)."""
    tree = ast.parse(path.read_text())
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        nodes = [node] if not isinstance(node, (ast.If, ast.Try)) else list(ast.walk(node))
        for n in nodes:
            if isinstance(n, ast.Import):
                out += [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                if n.level:
                    base = package.split(".")
                    base = base[: len(base) - (n.level - 1)]
                    target = ".".join(base + ([n.module] if n.module else []))
                else:
                    target = n.module or ""
                if n.module is None or (n.level and not n.module):  # from . import a, b
                    out += [f"{target}.{a.name}" for a in n.names]
                else:
                    out.append(target)
    return out


def _allowed(part: str, target: str) -> bool:
    if not target.startswith("inflightd"):
        if target.split(".")[0] == "numba_kernels":
            return "numba_kernels" in ALLOWED[part]
        return target.split(".")[0] not in FORBIDDEN_THIRD_PARTY.get(part, set())
    if target == "inflightd":
        return part in ("__init__",)
    rest = target.removeprefix("inflightd.")
    return any(rest == a or rest.startswith(a + ".") for a in ALLOWED[part])


def test_import_direction() -> None:
    """server → engine → runtime → models → numba_kernels, with the one inversion (the runtime
    implements the engine's Runner and imports its step types); the engine never imports the
    runtime or the models; nothing below the server imports aiohttp; the server imports no
    torch; numba_kernels imports nothing from inflightd."""
    bad = []
    for path in sorted(DAEMON.rglob("*.py")):
        module = _module_name(path)
        part = _part(module)
        for target in _imports(path):
            if not _allowed(part, target):
                bad.append(f"{module} imports {target}")
    for path in sorted((ROOT / "numba_kernels").glob("*.py")):
        text = path.read_text()
        if re.search(r"^\s*(from|import) inflightd", text, re.M):
            bad.append(f"numba_kernels/{path.name} imports inflightd")
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    """The import check itself: a relative import from the engine into the runtime is caught."""
    assert not _allowed("engine", "inflightd.runtime.model_runner")
    assert not _allowed("engine", "aiohttp.web")
    assert not _allowed("server", "torch")
    assert _allowed("runtime", "inflightd.engine.sequence") and _allowed("server", "aiohttp")


def test_server_and_client_load_no_torch() -> None:
    code = ("import sys; import inflightd.server.daemon, inflightd.server.app, inflightd.cli, "
            "inflightd.client.chat, inflightd.store.pull; "
            "print(sorted(m for m in ('torch', 'numba', 'numba_kernels') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_architecture_tree_matches_the_package() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    block = re.search(r"<!-- tree -->\n```\n(.*?)```", text, re.S)
    assert block, "ARCHITECTURE.md has no <!-- tree --> block"
    listed: set[str] = set()
    folders: list[tuple[int, str]] = []  # (indent, name) of the folders the line sits in
    for line in block.group(1).splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m:
            continue
        indent, name = len(m.group(1)), m.group(2)
        while folders and folders[-1][0] >= indent:
            folders.pop()
        if name.endswith("/"):
            folders.append((indent, name.rstrip("/")))
        elif name.endswith(".py"):
            listed.add("/".join([f for _, f in folders] + [name]))
    # each folder is a package whose __init__.py says what it holds: the folder line stands for it
    actual = {str(p.relative_to(ROOT)) for p in DAEMON.rglob("*.py") if p.parent == DAEMON or p.name != "__init__.py"}
    assert listed == actual, f"missing: {sorted(actual - listed)}; not in the tree: {sorted(listed - actual)}"


@pytest.mark.slow
def test_health_answers_loading_at_once(tmp_path: Path, default_gguf: Path) -> None:
    """The socket is bound, and answers "loading", before torch and the model are imported:
    the first /health comes back 503 within about a second of the start, long before READY."""
    t0 = time.monotonic()
    d = start_daemon(tmp_path, wait_ready=False)
    try:
        first = None
        while first is None:
            assert time.monotonic() - t0 < 30 and d.proc.poll() is None, d.log()
            try:
                conn = UnixHTTPConnection(d.socket_path, 5)
                conn.request("GET", "/health")
                r = conn.getresponse()
                first = (r.status, r.read(), time.monotonic() - t0)
                conn.close()
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.02)
        status, body, after = first
        assert status == 503 and b"loading" in body, first
        assert after < 3.0, f"/health first answered after {after:.2f} s"
        d.notify.wait_for("READY", "1", proc=d.proc)
        ready_after = time.monotonic() - t0
        assert ready_after > after
        assert d.request("GET", "/health").status == 200
    finally:
        assert d.stop() == 0, d.log()
