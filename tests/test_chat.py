"""`inflightd chat`.

- Through a pseudo-terminal (pexpect) against the session's real daemon, greedy: a question gets
  its answer; an answer of up to 400 tokens is shown as it streams, Ctrl-C cancels it (the prompt
  comes back, the daemon stops generating) and the session goes on; a follow-up reuses the
  conversation from the prefix cache (/stats shows cached tokens); bad /set values are refused
  with a message; Ctrl-C at the prompt drops the typed line; Ctrl-D exits 0 and the readline
  history lands in $XDG_STATE_HOME.
- Without a daemon: the chat refuses to start (exit 1); the session logic (multi-line input,
  /set validation, /system, a failed turn) with no terminal.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest
from daemon_util import INFLIGHTD, Daemon

from inflightd.client.chat import CONTINUATION, PROMPT, ChatSession, read_message
from inflightd.client.client import Client

PROMPT_RE = re.escape(PROMPT)


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("INFLIGHTD_SOCKET", None)
    env.update(HOME=str(home), XDG_STATE_HOME=str(home / "state"), TERM="dumb")
    return env


@pytest.fixture
def chat(daemon: Daemon, tmp_path: Path) -> Iterator[pexpect.spawn]:
    child = pexpect.spawn(INFLIGHTD, ["chat", "--socket", daemon.socket_path, "--temperature", "0"],
                          env=_env(tmp_path), encoding="utf-8", timeout=30, dimensions=(40, 200))
    try:
        child.expect(PROMPT_RE)
        yield child
    finally:
        if child.isalive():
            child.terminate(force=True)


def _command(child: pexpect.spawn, line: str) -> str:
    """Send a line, return what was printed before the next prompt (without the echo)."""
    child.sendline(line)
    child.expect(PROMPT_RE)
    out = str(child.before).replace("\r\n", "\n")
    return out.split("\n", 1)[1] if "\n" in out else ""


@pytest.mark.slow
def test_chat_streams_cancels_and_follows_up(chat: pexpect.spawn, daemon: Daemon, tmp_path: Path) -> None:
    assert "SmolLM2-135M-Instruct" in str(chat.before)
    assert _command(chat, "/set max_tokens 24") == "max_tokens = 24\n"
    assert "error: temperature: must be a number in [0, 100]" in _command(chat, "/set temperature -1")
    assert "error: top_k: must be an integer (got 'many')" in _command(chat, "/set top_k many")
    assert "temperature=0.0" in _command(chat, "/set")

    answer = _command(chat, "What is the capital of France?")
    assert "Paris" in answer

    # A long answer: text shows up while it is still being generated, and Ctrl-C stops it.
    assert _command(chat, "/set max_tokens 400") == "max_tokens = 400\n"
    chat.sendline("Tell me a long story about a brave knight and a dragon.")
    chat.expect(r"\n")  # the echo of the question
    chat.expect(r"\w\w")  # the first words of the answer, long before 400 tokens
    chat.sendcontrol("c")
    chat.expect(r"\[cancelled\]")
    chat.expect(PROMPT_RE)
    client = Client(daemon.socket_path)
    deadline = time.monotonic() + 5
    while client.status()["running"] != 0:
        assert time.monotonic() < deadline, "the daemon kept generating the cancelled answer"
        time.sleep(0.05)
    stats = _command(chat, "/stats")
    assert re.search(r"last answer \(cancelled\): prompt \d+ tokens \(\d+ cached\), \d+ tokens received", stats), stats
    assert "conversation: 4 messages" in stats  # the cancelled answer's text stays

    # The follow-up resends the whole conversation: the daemon has its prefix cached.
    assert _command(chat, "/set max_tokens 16") == "max_tokens = 16\n"
    follow_up = _command(chat, "Now say it in one sentence.")
    assert follow_up.strip()
    stats = _command(chat, "/stats")
    m = re.search(r"last answer \((stop|length)\): prompt (\d+) tokens \((\d+) cached\), completion \d+ tokens", stats)
    assert m, stats
    prompt_tokens, cached = int(m[2]), int(m[3])
    assert 0 < cached < prompt_tokens and prompt_tokens > 60, stats
    assert re.search(r"ttft [\d.]+ ms, tpot [\d.]+ ms", stats), stats
    assert "conversation: 6 messages" in stats

    # Ctrl-C at the prompt drops what was typed; nothing is sent.
    chat.send("this is never sent")
    # Wait for readline to have echoed the text: a Ctrl-C that arrives while readline is still
    # reading typed-ahead keys is only acted on at the next key (CPython's readline checks
    # signals when its select() is interrupted, not its read()) — a person is never that fast.
    chat.expect("never sent")
    time.sleep(0.1)
    chat.sendcontrol("c")
    chat.expect(PROMPT_RE)
    assert "conversation: 6 messages" in _command(chat, "/stats")

    chat.sendcontrol("d")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
    history = (tmp_path / "state" / "inflightd" / "chat_history").read_text()
    assert "What is the capital of France?" in history and "this is never sent" not in history


def test_chat_without_daemon(tmp_path: Path) -> None:
    path = str(tmp_path / "none.sock")
    proc = subprocess.run([INFLIGHTD, "chat", "--socket", path], capture_output=True, text=True, timeout=30,
                          env=_env(tmp_path), stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert f"no inflightd daemon is listening on {path}" in proc.stderr


# ------------------------------------------------------------------------------ no terminal
def _reader(lines: list[str]) -> tuple[list[str], Callable[[str], str]]:
    prompts: list[str] = []
    feed = iter(lines)

    def read(prompt: str) -> str:
        prompts.append(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return prompts, read


@pytest.mark.parametrize(
    "lines, text, n_prompts",
    [
        (["hello"], "hello", 1),
        (["first \\", "second\\", "third"], "first \nsecond\nthird", 3),
        (['"""', "a", "", "  b", '"""'], "a\n\n  b", 5),
        (['"""a', 'b"""'], "a\nb", 2),
        (['"""one line"""'], "one line", 1),
    ],
)
def test_multi_line_input(lines: list[str], text: str, n_prompts: int) -> None:
    prompts, read = _reader(lines)
    assert read_message(read) == text
    assert prompts == [PROMPT] + [CONTINUATION] * (n_prompts - 1)


def test_session_commands_without_daemon(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    s = ChatSession(Client(str(tmp_path / "none.sock")), out, err)
    assert s.settings == {"temperature": 0.7, "top_p": 0.9}
    for bad, message in [
        ("/set top_p 0", "top_p: must be in (0, 1]"),
        ("/set max_tokens 0", "max_tokens: must be an integer ≥ 1"),
        ("/set seed 1.5", "seed: must be an integer"),
        ("/set colour blue", "unknown option 'colour'"),
        ("/set temperature", "usage: /set KEY VALUE"),
        ("/frobnicate", "unknown command /frobnicate"),
    ]:
        assert s.handle(bad)
        assert message in err.getvalue(), (bad, err.getvalue())
    assert s.settings == {"temperature": 0.7, "top_p": 0.9}
    assert s.handle("/set min_p=0.05") and s.handle("/set temperature default")
    assert s.request_body() == {"messages": [], "top_p": 0.9, "min_p": 0.05}

    # A turn the daemon cannot take is dropped from the conversation, and the session goes on.
    assert s.handle("hello")
    assert "no inflightd daemon is listening" in err.getvalue() and s.messages == []

    s.messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert s.handle("/system Answer in French.")
    assert s.messages == [] and s.request_body()["messages"] == [{"role": "system", "content": "Answer in French."}]
    assert s.handle("/system -") and s.system is None
    assert not s.handle("/exit")
