"""The client subcommands of `inflightd`: `chat`, `complete`, `status` and `reload`, each talking
to a running daemon over its Unix socket (`client.py`).

`add_client_commands(sub)` registers them on the main parser's subparsers; each sets
`func(args) -> int` (the exit code). A client error (no daemon, an HTTP error, a broken stream)
is one line on stderr and exit 1, never a traceback. Nothing here imports torch: these commands
start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any

from .client import Client, ClientError

SOCKET_HELP = ("the daemon's Unix socket (default: $INFLIGHTD_SOCKET, else $XDG_RUNTIME_DIR/inflightd/inflightd.sock, "
               "or the system service's /run/inflightd/inflightd.sock when only that one exists)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0.0 <= value < float("inf"):  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    value = non_negative_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _fail(command: str, e: BaseException) -> int:
    print(f"inflightd {command}: {e}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------------- chat
def _cmd_chat(args: argparse.Namespace) -> int:
    from .chat import run  # readline and the session: only for this command

    return run(args)


# ------------------------------------------------------------------------------ complete
def _cmd_complete(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    body: dict[str, Any] = (
        {"messages": [{"role": "user", "content": text}]} if args.chat else {"prompt": text}
    )
    body["temperature"] = args.temperature
    for key in ("max_tokens", "top_p", "seed"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    client = Client(args.socket)
    out = sys.stdout
    end: dict[str, Any] | None = None
    last = ""
    t0 = time.monotonic()
    try:
        with contextlib.closing(client.generate_stream(body)) as frames:
            for frame in frames:
                if frame.get("type") == "delta" and frame.get("text"):
                    last = str(frame["text"])
                    out.write(last)
                    out.flush()
                elif frame.get("type") == "end":
                    end = frame
    except ClientError as e:
        if last:
            out.write("\n")
            out.flush()
        return _fail("complete", e)
    except BrokenPipeError:  # `| head`: the reader left, which closed the stream and aborted the request
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 1
    wall = time.monotonic() - t0
    if out.isatty() and not last.endswith("\n"):  # keep the shell prompt off the answer's line; pipes get it raw
        out.write("\n")
    out.flush()
    assert end is not None  # parse_frames returns only after an end frame
    if args.stats:
        print(_usage_line(end, wall), file=sys.stderr)
    if end.get("finish_reason") == "abort":
        print("inflightd complete: the daemon aborted the request (is it stopping?)", file=sys.stderr)
        return 1
    return 0


def _usage_line(end: dict[str, Any], wall_s: float) -> str:
    u, t = end.get("usage") or {}, end.get("timing") or {}
    completion = int(u.get("completion_tokens", 0))
    tpot = float(t.get("tpot_ms", 0.0))
    rate = f" ({1000 / tpot:.1f} tok/s)" if tpot > 0 else ""
    return (
        f"finish {end.get('finish_reason')}: prompt {u.get('prompt_tokens', 0)} tokens "
        f"({u.get('cached_tokens', 0)} cached), completion {completion} tokens; "
        f"queue {float(t.get('queue_ms', 0.0)):.1f} ms, ttft {float(t.get('ttft_ms', 0.0)):.1f} ms, "
        f"tpot {tpot:.1f} ms{rate}; {wall_s:.2f} s in all"
    )


# -------------------------------------------------------------------------------- status
def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h:02d}h {m:02d}m"
    if h:
        return f"{h}h {m:02d}m {s:02d}s"
    return f"{m}m {s:02d}s" if m else f"{seconds:.1f}s"


def _clock(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t))) if isinstance(t, (int, float)) else "?"


def reload_summary(r: dict[str, Any]) -> str:
    """One line for a reload result, as `status` and `reload` print it."""
    if not r.get("ok"):
        return f"failed at {_clock(r.get('time'))}, the previous config stays in force: {r.get('error')}"
    applied = r.get("applied") or []
    changes = f"applied {', '.join(applied)}" if applied else "no live key changed"
    line = f"ok at {_clock(r.get('time'))}: {changes}"
    if r.get("restart_required"):
        line += f"; needs a restart (running values kept): {', '.join(r['restart_required'])}"
    return line


def format_status(st: dict[str, Any], socket_path: str) -> str:
    """`/v1/status` for people. A daemon still loading has no engine yet: only what exists."""
    rows: list[tuple[str, str]] = []
    device = st.get("device")
    on = f" on {device}" + (f" ({st['dtype']})" if st.get("dtype") else "") if device else ""
    head = f"inflightd: {st.get('state', '?')} — {st.get('model', '?')}{on}"
    rows.append(("socket", socket_path))
    rows.append(("pid", str(st.get("pid", "?"))))
    if isinstance(st.get("uptime_s"), (int, float)):
        ready = st.get("ready_after_s")
        rows.append(("uptime", _duration(st["uptime_s"])
                     + (f" (ready after {ready:.1f} s)" if isinstance(ready, (int, float)) else "")))
    if "running" in st:
        rows.append(("requests", f"{st['running']} running, {st.get('queue_depth', 0)} queued"))
    if "kv_blocks_total" in st:
        used, total = int(st.get("kv_blocks_used", 0)), int(st["kv_blocks_total"])
        share = f" ({100 * used / total:.1f} %)" if total else ""
        size = f", {st['kv_block_size']} tokens each" if st.get("kv_block_size") else ""
        rows.append(("KV blocks", f"{used} / {total} used{share}{size}"))
    if "prefix_hit_rate" in st:
        rows.append(("prefix cache", f"{100 * float(st['prefix_hit_rate']):.1f} % of prompt tokens hit"))
    if "tokens_per_s" in st:
        rows.append(("throughput", f"{float(st['tokens_per_s']):.1f} tokens/s (last 10 s)"))
    if st.get("usd_per_million_tokens") is not None:
        rows.append(("cost", f"${st['usd_per_million_tokens']} per million tokens"))
    if st.get("max_model_len"):
        rows.append(("context", f"{st['max_model_len']} tokens"))
    if st.get("preemptions"):
        rows.append(("preemptions", str(st["preemptions"])))
    rows.append(("config file", st.get("config_file") or "none (built-in defaults)"))
    last = st.get("last_reload")
    rows.append(("last reload", "none since start" if not last else reload_summary(last)))
    if st.get("engine_error"):
        rows.append(("engine error", str(st["engine_error"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join([head] + [f"  {k.ljust(width)}  {v}" for k, v in rows])


def _cmd_status(args: argparse.Namespace) -> int:
    client = Client(args.socket)
    try:
        st = client.status()
    except ClientError as e:
        return _fail("status", e)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(format_status(st, client.socket_path))
    return 0


# -------------------------------------------------------------------------------- reload
def _cmd_reload(args: argparse.Namespace) -> int:
    client = Client(args.socket)
    try:
        r = client.reload()
    except ClientError as e:
        return _fail("reload", e)
    if args.json:
        print(json.dumps(r, indent=2))
    elif r.get("ok"):
        print(f"reloaded {r.get('file')}: " + reload_summary(r).split(": ", 1)[1])
    else:
        print(f"inflightd reload: {r.get('error')}\nthe previous config stays in force", file=sys.stderr)
    return 0 if r.get("ok") else 1


# ------------------------------------------------------------------------------ register
def add_client_commands(sub: Any) -> None:
    """Register chat, complete, status and reload on `sub` (from `add_subparsers`)."""
    from .chat import DEFAULTS

    p = sub.add_parser(
        "chat",
        help="chat with the running daemon in the terminal",
        description="A terminal chat with the running daemon. Answers stream as they are generated; "
        "Ctrl-C cancels an answer, Ctrl-D leaves. Type /help inside for the commands (/system, /reset, "
        "/set, /stats). History: $XDG_STATE_HOME/inflightd/chat_history.",
        epilog=f"Defaults: temperature {DEFAULTS['temperature']}, top_p {DEFAULTS['top_p']}; max_tokens, "
        "top_k, min_p, seed and repetition_penalty are the daemon's (max_tokens: its "
        "limits.default_max_tokens, capped by the context left). Exit status 1 when no daemon answers.",
    )
    p.add_argument("--socket", metavar="PATH", help=SOCKET_HELP)
    p.add_argument("--system", metavar="TEXT", help="a system prompt (default: the model's own)")
    p.add_argument("--max-tokens", type=positive_int, metavar="N", help="longest answer in tokens")
    p.add_argument("--temperature", type=non_negative_float, metavar="T",
                   help=f"sampling temperature, 0 = greedy (default {DEFAULTS['temperature']})")
    p.add_argument("--top-p", type=unit_interval, metavar="P", help=f"nucleus sampling (default {DEFAULTS['top_p']})")
    p.add_argument("--seed", type=int, metavar="N", help="sampling seed, for reproducible answers")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser(
        "complete",
        help="complete TEXT once with the running daemon, streamed to stdout",
        description="Send TEXT as a raw prompt (or with --chat as one user message) to the running daemon "
        "and stream the completion to stdout. TEXT '-' reads it from stdin.",
        epilog="Exit status: 0 done, 1 no daemon or an error (printed on stderr).",
    )
    p.add_argument("text", metavar="TEXT", help="the prompt; '-' reads stdin")
    p.add_argument("--socket", metavar="PATH", help=SOCKET_HELP)
    p.add_argument("--max-tokens", type=positive_int, metavar="N",
                   help="longest completion (default: the daemon's limits.default_max_tokens)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, metavar="T",
                   help="0 is greedy (the default, so completions are reproducible)")
    p.add_argument("--top-p", type=unit_interval, metavar="P", help="nucleus sampling (default 1: off)")
    p.add_argument("--seed", type=int, metavar="N", help="sampling seed")
    p.add_argument("--chat", action="store_true",
                   help="send TEXT as a user message through the model's chat template")
    p.add_argument("--stats", action="store_true", help="print token counts and timing to stderr at the end")
    p.set_defaults(func=_cmd_complete)

    p = sub.add_parser(
        "status",
        help="show the running daemon's state",
        description="State, model, device, queue, KV cache, prefix-cache hit rate, throughput, config file and "
        "the last reload of the running daemon.",
        epilog="Exit status: 0 when the daemon answered (whatever its state), 1 when none answers.",
    )
    p.add_argument("--socket", metavar="PATH", help=SOCKET_HELP)
    p.add_argument("--json", action="store_true", help="print /v1/status as JSON")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser(
        "reload",
        help="make the running daemon re-read its config file",
        description="Like SIGHUP: the daemon re-reads its config file; live keys (scheduler, limits, slo, cost, "
        "log) apply at its next step, the others are reported as needing a restart. An invalid file changes "
        "nothing.",
        epilog="Exit status: 0 reloaded, 1 the file was invalid (the old config stays) or no daemon answers.",
    )
    p.add_argument("--socket", metavar="PATH", help=SOCKET_HELP)
    p.add_argument("--json", action="store_true", help="print the reload result as JSON")
    p.set_defaults(func=_cmd_reload)
