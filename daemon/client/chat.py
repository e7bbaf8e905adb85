"""`inflightd chat`: a terminal chat with the daemon over its socket.

Owns the interactive loop: reading (multi-line) input with readline history, the slash
commands, the conversation kept as `messages`, streaming each answer to the terminal as its
tokens arrive, and Ctrl-C handling. The conversation is resent whole on every turn: the daemon's
prefix cache recognises the part it has already seen, so a follow-up costs only its new tokens
(`/stats` shows how many were cached).

Turns that fail are dropped from the conversation (the question can be sent again as is); a
cancelled answer keeps what was shown, so that "shorter, please" refers to it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..engine.sampling_params import SamplingParams, SamplingParamsError
from .client import Client, ClientError, DaemonError

PROMPT = ">>> "
CONTINUATION = "... "
BLOCK = '"""'

# Sampling that suits a conversation with a small model: some variety, with the unlikely tail
# cut off. Anything not listed is the daemon's default (max_tokens: limits.default_max_tokens,
# capped by the context left).
DEFAULTS: dict[str, int | float | None] = {"temperature": 0.7, "top_p": 0.9}
SETTABLE: dict[str, type] = {
    "max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int,
    "repetition_penalty": float,
}
UNSET_WORDS = ("default", "none", "off")

HELP = f"""\
Type a message and press Enter. The whole conversation goes to the daemon each turn; its
prefix cache makes follow-ups cheap.

Multi-line input: end a line with \\ to continue it, or enclose lines in {BLOCK} ... {BLOCK}.
To send a message that starts with /, start it with //.

  /system TEXT     set the system prompt and start a new conversation
  /system          show the system prompt; /system - removes it
  /reset           start a new conversation (keeps the system prompt and settings)
  /set KEY VALUE   set a sampling option: {", ".join(SETTABLE)}
                   (VALUE "default" gives the key back to the daemon's default)
  /set             show the options in force
  /stats           tokens, cached prompt tokens and timing of the last answer
  /help            this text
  /exit            leave (Ctrl-D too)

Ctrl-C while an answer streams cancels it: what was shown stays in the conversation, so you can
refer to it ("shorter, please"); an answer cancelled before its first word is dropped with its
question. A question the daemon refuses (too long, queue full, …) is dropped too: send it again.
Ctrl-C at the prompt clears the line.
"""


@dataclass
class AnswerStats:
    """What one answer cost: the daemon's numbers (`usage`, `timing`) when it finished, the
    client's own clock when it was cancelled."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # None: cancelled or failed before the end frame
    timing: dict[str, float] = field(default_factory=dict)
    first_token_s: float | None = None  # client clock, from sending the request
    wall_s: float = 0.0


def history_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "inflightd" / "chat_history"


def parse_setting(key: str, text: str) -> int | float | None:
    """The value for `/set KEY TEXT` (None: back to the daemon's default); ValueError names the
    key and what it must be."""
    if key not in SETTABLE:
        raise ValueError(f"unknown option {key!r}; options: {', '.join(SETTABLE)}")
    if text.lower() in UNSET_WORDS:
        return None
    kind = SETTABLE[key]
    try:
        value: int | float = int(text) if kind is int else float(text)
    except ValueError:
        raise ValueError(f"{key}: must be {'an integer' if kind is int else 'a number'} (got {text!r})") from None
    return value


def check_settings(settings: dict[str, int | float | None]) -> None:
    """Raise ValueError (naming the key) if the daemon would refuse these values: the same
    checks it runs, done here so that a typo is caught at `/set`, not at the next question."""
    given = {k: v for k, v in settings.items() if v is not None}
    try:
        SamplingParams(**given)  # type: ignore[arg-type]
    except SamplingParamsError as e:
        raise ValueError(str(e)) from None


class ChatSession:
    """The conversation and its commands; independent of the terminal, so it is testable with
    any `read` function and output stream."""

    def __init__(self, client: Client, out: TextIO, err: TextIO, *, system: str | None = None,
                 settings: dict[str, int | float | None] | None = None, max_model_len: int | None = None) -> None:
        self.client = client
        self.out = out
        self.err = err
        self.system = system
        self.settings: dict[str, int | float | None] = dict(DEFAULTS if settings is None else settings)
        self.messages: list[dict[str, str]] = []
        self.last: AnswerStats | None = None
        self.max_model_len = max_model_len

    # ------------------------------------------------------------------------------- output
    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def error(self, text: str) -> None:
        self.out.flush()
        self.err.write(f"error: {text}\n")
        self.err.flush()

    # ------------------------------------------------------------------------------ dispatch
    def handle(self, text: str) -> bool:
        """One input (a message or a command); False when the session should end."""
        stripped = text.strip()
        if not stripped:
            return True
        if stripped.startswith("//"):
            self.ask(text.lstrip()[1:])
        elif stripped.startswith("/"):
            return self.command(stripped)
        else:
            self.ask(text)
        return True

    def command(self, line: str) -> bool:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.out.write(HELP)
        elif name == "/reset":
            self.messages.clear()
            self.last = None
            self.say("[new conversation]")
        elif name == "/system":
            self._system(arg)
        elif name == "/set":
            self._set(arg)
        elif name == "/stats":
            self.say(self.stats_text())
        else:
            self.error(f"unknown command {name} (type /help); to send a message that starts with /, "
                       "start it with //")
        return True

    def _system(self, arg: str) -> None:
        if not arg:
            self.say(f"system prompt: {self.system!r}" if self.system else "no system prompt (the model's default)")
            return
        self.system = None if arg == "-" else arg
        self.messages.clear()
        self.last = None
        self.say("[system prompt removed; new conversation]" if self.system is None
                 else "[system prompt set; new conversation]")

    def _set(self, arg: str) -> None:
        if not arg:
            shown = ", ".join(
                f"{k}={self.settings[k]}" if self.settings.get(k) is not None else f"{k}=default" for k in SETTABLE
            )
            self.say(shown)
            return
        key, sep, value = arg.partition("=") if "=" in arg else arg.partition(" ")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            self.error(f"usage: /set KEY VALUE, with KEY one of {', '.join(SETTABLE)}")
            return
        try:
            parsed = parse_setting(key, value)
            candidate = {**self.settings, key: parsed}
            check_settings(candidate)
        except ValueError as e:
            self.error(str(e))
            return
        self.settings = candidate
        self.say(f"{key} = {'default' if parsed is None else parsed}")

    # ------------------------------------------------------------------------------- asking
    def request_body(self) -> dict[str, Any]:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        body: dict[str, Any] = {"messages": messages}
        body.update({k: v for k, v in self.settings.items() if v is not None})
        return body

    def ask(self, text: str) -> None:
        """Send `text` as the next user message and stream the answer to `out`."""
        self.messages.append({"role": "user", "content": text})
        stats = AnswerStats()
        parts: list[str] = []
        t0 = time.monotonic()
        frames = self.client.generate_stream(self.request_body())
        cancelled = False
        failure: ClientError | None = None
        try:
            for frame in frames:
                kind = frame.get("type")
                if kind == "start":
                    stats.prompt_tokens = int(frame.get("prompt_tokens", 0))
                    stats.cached_tokens = int(frame.get("cached_tokens", 0))
                elif kind == "delta":
                    if stats.first_token_s is None:
                        stats.first_token_s = time.monotonic() - t0
                    stats.completion_tokens += len(frame.get("token_ids") or ())
                    piece = str(frame.get("text", ""))
                    if piece:
                        parts.append(piece)
                        self.out.write(piece)
                        self.out.flush()
                elif kind == "end":
                    stats.finish_reason = str(frame.get("finish_reason"))
                    usage = frame.get("usage") or {}
                    stats.prompt_tokens = int(usage.get("prompt_tokens", stats.prompt_tokens))
                    stats.cached_tokens = int(usage.get("cached_tokens", stats.cached_tokens))
                    stats.completion_tokens = int(usage.get("completion_tokens", stats.completion_tokens))
                    stats.timing = {k: float(v) for k, v in (frame.get("timing") or {}).items()}
        except KeyboardInterrupt:
            cancelled = True
        except ClientError as e:
            failure = e
        finally:
            frames.close()  # closes the connection: the daemon aborts the request
        stats.wall_s = time.monotonic() - t0
        answer = "".join(parts)
        if answer and not answer.endswith("\n"):
            self.out.write("\n")
        self.out.flush()
        self.last = stats
        if failure is not None:
            self.messages.pop()
            self._report(failure)
            return
        if cancelled:
            self.say("[cancelled]")
            if answer:
                self.messages.append({"role": "assistant", "content": answer})
            else:
                self.messages.pop()
            return
        self.messages.append({"role": "assistant", "content": answer})
        if stats.finish_reason == "length":
            self.say(f"[stopped at max_tokens ({stats.completion_tokens}); /set max_tokens N for longer answers]")
        elif stats.finish_reason == "abort":
            self.say("[the daemon aborted this answer (it is stopping?)]")

    def _report(self, e: ClientError) -> None:
        if isinstance(e, DaemonError) and e.status == 400 and "context" in e.message:
            self.error(f"{e.message} — /reset starts a new conversation")
        elif isinstance(e, DaemonError) and e.retry_after is not None:
            self.error(f"{e.message} (the daemon asks to retry after {e.retry_after:g} s)")
        elif isinstance(e, DaemonError):
            self.error(e.message)
        else:
            self.error(str(e))

    def stats_text(self) -> str:
        s = self.last
        if s is None:
            return "no answer yet"
        lines = []
        if s.finish_reason is None:
            first = "" if s.first_token_s is None else f", first token after {s.first_token_s * 1000:.0f} ms"
            lines.append(f"last answer (cancelled): prompt {s.prompt_tokens} tokens ({s.cached_tokens} cached), "
                         f"{s.completion_tokens} tokens received in {s.wall_s:.2f} s{first}")
        else:
            lines.append(f"last answer ({s.finish_reason}): prompt {s.prompt_tokens} tokens ({s.cached_tokens} "
                         f"cached), completion {s.completion_tokens} tokens")
            t = s.timing
            tpot = t.get("tpot_ms", 0.0)
            decode = f" = {1000 / tpot:.1f} tok/s decoding" if tpot > 0 else ""
            e2e = s.completion_tokens / s.wall_s if s.wall_s > 0 else 0.0
            lines.append(f"  ttft {t.get('ttft_ms', 0.0):.1f} ms, tpot {tpot:.1f} ms{decode}, queue "
                         f"{t.get('queue_ms', 0.0):.1f} ms; {s.wall_s:.2f} s in all = {e2e:.1f} tok/s end to end")
        used = s.prompt_tokens + s.completion_tokens
        of = f" of {self.max_model_len}" if self.max_model_len else ""
        lines.append(f"  conversation: {len(self.messages)} messages, ~{used}{of} context tokens")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- terminal
def read_message(read: Callable[[str], str]) -> str:
    """One message from `read` (input()): a line, lines joined by a trailing backslash, or a
    triple-quoted block. EOFError and KeyboardInterrupt pass through."""
    line = read(PROMPT)
    if line.lstrip().startswith(BLOCK):
        first = line.lstrip()[len(BLOCK):]
        if first.rstrip().endswith(BLOCK):  # """one line"""
            return first.rstrip()[: -len(BLOCK)]
        lines = [first] if first else []
        while True:
            line = read(CONTINUATION)
            if line.rstrip().endswith(BLOCK):
                last = line.rstrip()[: -len(BLOCK)]
                if last:
                    lines.append(last)
                return "\n".join(lines)
            lines.append(line)
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        line = read(CONTINUATION)
    parts.append(line)
    return "\n".join(parts)


def messages_from(read: Callable[[str], str], out: TextIO) -> Iterator[str]:
    """Messages until end of input; Ctrl-C at the prompt drops what was typed."""
    while True:
        try:
            yield read_message(read)
        except KeyboardInterrupt:
            out.write("\n")
            out.flush()
        except EOFError:
            out.write("\n")
            out.flush()
            return


class _History:
    """readline history in $XDG_STATE_HOME/inflightd/chat_history; a file that cannot be read
    or written costs the history, never the session."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.readline: Any = None
        try:
            import readline
        except ImportError:  # Python built without readline: plain input() still works
            return
        self.readline = readline
        readline.set_history_length(1000)
        try:
            readline.read_history_file(str(path))
        except OSError:
            pass

    def save(self) -> None:
        if self.readline is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Conversations are private: create the file owner-only before readline writes it.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            self.readline.write_history_file(str(self.path))
        except OSError:
            pass


def run(args: argparse.Namespace) -> int:
    """`inflightd chat`: 0 at Ctrl-D or /exit, 1 when no daemon answers."""
    client = Client(args.socket)
    try:
        status = client.status()
    except ClientError as e:
        print(f"inflightd chat: {e}", file=sys.stderr)
        return 1
    settings = dict(DEFAULTS)
    for key in SETTABLE:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    try:
        check_settings(settings)
    except ValueError as e:
        print(f"inflightd chat: {e}", file=sys.stderr)
        return 2
    session = ChatSession(client, sys.stdout, sys.stderr, system=args.system, settings=settings,
                          max_model_len=status.get("max_model_len"))
    where = f"{status.get('model', '?')} on {status.get('device', '?')}"
    print(f"inflightd chat — {where} ({client.socket_path}). /help for commands, Ctrl-D to leave.")
    if status.get("state") != "ready":
        print(f"[the daemon is {status.get('state')}: questions get an error until it is ready]")
    history = _History(history_path()) if sys.stdin.isatty() else None
    try:
        for text in messages_from(input, sys.stdout):
            try:
                if not session.handle(text):
                    break
            except KeyboardInterrupt:  # during a command: drop it, keep the session
                session.say("")
    finally:
        if history is not None:
            history.save()
    return 0
