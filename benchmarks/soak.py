"""Soak test of the real daemon under a mixed, partly hostile load, run by hand (not by pytest).

    .venv/bin/python benchmarks/soak.py --minutes 30 [--clients 8] [--seed 0] [--json soak.json]

It starts `inflightd serve` on a temporary socket with a deliberately small KV cache (64 MiB, so
that sequences are preempted now and then), `limits.request_timeout_s: 30`,
`limits.write_timeout_s: 5`, `limits.default_max_tokens: 64` and `scheduler.max_num_seqs: 16`,
waits for GET /health == 200, warms it up, then for `--minutes` runs `--clients` client threads,
each drawing one request at a time from this mix:

- good requests (~68 %): native msgpack streams and whole answers (POST /v1/generate), OpenAI
  chat completions and completions, streamed (SSE) and not, with varied sampling, stop strings,
  `ignore_eos`, a shared system prompt (prefix-cache hits) and some long prompts (KV pressure).
  Each answer is checked: 200, exactly one terminal frame/[DONE] and nothing after it, a finish
  reason, usage that matches the tokens streamed, no more tokens than max_tokens, no stop string
  in the text;
- clients that disconnect (~10 %): mid-stream after a few deltas, or right after sending;
- a client that stops reading (~1 %, at least one per run): a large streamed answer (top-20
  logprobs) it does not read for 3 x write_timeout_s, which the daemon must drop;
- bad inputs (~11 %): invalid JSON, deep nesting (JSON and msgpack), wrong types, huge ints,
  unknown roles, 17 stop strings, a wrong Content-Type, oversized bodies (announced and real),
  prompts over the KV cache or the context, unsupported fields; each must get a 4xx with an
  `{"error": {"type", "message"}}` body.

Meanwhile a reloader rewrites the config file and POSTs /v1/reload every ~10 s, alternating two
valid configs (different max_num_seqs and max_queue_delay_ms; each must answer 200 and show in
/v1/status) and, every fourth reload, an invalid one (must answer 400 and change nothing).

Recorded: daemon RSS after warm-up, at the end and every ~1/12 of the run, with its growth over
the second half in MB/min (reported, not judged: what is normal depends on the machine);
requests by kind; tokens; expected refusals vs. unexpected errors (any 5xx, a connection error on
a good request, a stream without its terminal frame, a malformed answer, a reload misbehaving, a
traceback in the daemon's log). After the load stops it waits for /v1/status to show nothing
running or queued and reads `kv_blocks_used` (anything but 0 is a leak), reads /metrics (the
requests the engine ended must match what the clients sent it), then stops the daemon with
SIGTERM (it must exit 0).

Prints a compact report (`--json PATH` also writes it as JSON) and exits 1 on any unexpected
error, a leaked KV block, or a daemon that died; the daemon's log is kept when the run fails.
"""

from __future__ import annotations

import argparse
import fcntl
import http.client
import json
import os
import platform
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import psutil

INFLIGHTD = str(Path(sys.executable).with_name("inflightd"))
MSGPACK = "application/msgpack"
JSON = "application/json"
NATIVE_STREAM = "application/vnd.inflightd.stream+msgpack"

WRITE_TIMEOUT_S = 5.0
DEFAULT_MAX_TOKENS = 64
MAX_BODY_BYTES = 1 << 20  # the daemon's default limits.max_body_bytes
RELOAD_EVERY_S = 10.0
INVALID_EVERY = 4  # every n-th reload is an invalid file
HTTP_TIMEOUT_S = 75.0  # > request_timeout_s: a stalled stream is the daemon's to end, not ours

CONFIG = """\
# written by benchmarks/soak.py ({name})
model: {{path: default}}
scheduler: {{max_num_seqs: {seqs}, max_queue_delay_ms: {delay}}}
kv_cache: {{memory: 64MiB}}
limits: {{request_timeout_s: 30, write_timeout_s: {wt:g}, default_max_tokens: {dmt}}}
"""
# The two configs reloads alternate between; A is the one the daemon starts with.
CONFIGS = [("A", 16, 2), ("B", 6, 25)]
INVALID_CONFIGS = [
    "scheduler: {max_num_seqz: 4}\n",  # a typo: unknown key
    "scheduler: {max_num_seqs: many}\n",  # wrong type
    "limits: {request_timeout_s: -5}\n",  # out of range
    "scheduler: [max_num_seqs\n",  # not YAML
]


def config_text(name: str, seqs: int, delay: float) -> str:
    return CONFIG.format(name=name, seqs=seqs, delay=delay, wt=WRITE_TIMEOUT_S, dmt=DEFAULT_MAX_TOKENS)


# ------------------------------------------------------------------------------------ HTTP
class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = HTTP_TIMEOUT_S) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def call(path: str, method: str, route: str, body: bytes | None = None, ctype: str = JSON,
         timeout: float = 30.0) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request(method, route, body=body, headers={"Content-Type": ctype} if body is not None else {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def get_json(path: str, route: str) -> Any:
    status, body = call(path, "GET", route)
    if status != 200:
        raise RuntimeError(f"GET {route}: {status} {body[:200]!r}")
    return json.loads(body)


def raw_exchange(path: str, data: bytes, timeout: float = 60.0) -> tuple[int | None, dict[str, str], bytes]:
    """Send raw bytes (a request with `Connection: close`), read until the daemon closes. Used
    for bad inputs: a refused oversized body makes the daemon close before reading it all, which
    http.client reports as an error instead of the answer that is waiting in our buffer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    got = bytearray()
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the body was read: the answer is still there to read
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass  # the daemon closed with our unread bytes in its buffer (413): the answer came first
    finally:
        s.close()
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status: int | None = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return None, {}, bytes(got)
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def http_request(route: str, body: bytes, ctype: str, extra: str = "", method: str = "POST",
                 length: int | None = None) -> bytes:
    head = (f"{method} {route} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n{extra}\r\n")
    return head.encode() + body


def read_chunks(r: http.client.HTTPResponse) -> Iterator[bytes]:
    while chunk := r.read1(65536):
        yield chunk


def sse_events(chunks: Iterator[bytes]) -> Iterator[str]:
    buf = b""
    for chunk in chunks:
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    yield line[6:].decode()


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------- workload
SYSTEM = ("You are a concise assistant for a small engineering team. Answer in plain English, in at most "
          "three sentences, and say so when you do not know something.")
QUESTIONS = [
    "What is the capital of France?", "Explain what a mutex is.", "Write a haiku about the sea.",
    "Give me three tips for writing clear emails.", "What does HTTP status 413 mean?",
    "How do I reverse a list in Python?", "Summarise the plot of Hamlet in two sentences.",
    "Why is the sky blue?", "List the planets of the solar system.", "What is a KV cache in a transformer?",
    "Suggest a name for a grey cat.", "How many minutes are there in a week?",
    "Translate 'good morning' into Spanish and German.", "What is the difference between TCP and UDP?",
    "Describe a rainy afternoon in one paragraph.", "Is 97 a prime number? Explain.",
]
COMPLETION_PROMPTS = [
    "Once upon a time", "The three most important rules of cooking are", "def fibonacci(n):",
    "Dear team, I am writing to let you know that", "The history of the printing press begins",
    "In summary, the experiment showed",
]
PARAGRAPH = ("The station log records every train that passed the junction: its number, the time it was "
             "due, the time it came, and the platform it used. On busy days the clerk wrote in pencil first "
             "and copied the entries in ink at night, so that a late change would not spoil the page. ")
STOPS = ["\n\n", ".", "!", " the ", "?", ":", "\n"]


LONG_SHARE = 0.3  # of prompts
# Paragraphs in a long prompt: 20-40 % of the KV cache, set by `size_long_prompts` once the
# daemon tells its capacity (64 MiB is ~2900 tokens in bfloat16, ~1450 in float32). With 30 % of
# 8 clients' prompts long, the cache overflows now and then: sequences are preempted.
long_paragraphs = (8, 16)


def size_long_prompts(sock: str, capacity_tokens: int) -> None:
    global long_paragraphs
    status, body = call(sock, "POST", "/v1/tokenize", json.dumps({"text": PARAGRAPH * 10}).encode())
    per = json.loads(body)["count"] / 10 if status == 200 else 60.0
    long_paragraphs = (max(1, int(0.2 * capacity_tokens / per)), max(1, int(0.4 * capacity_tokens / per)))


def long_text(rng: random.Random) -> str:
    # The random note makes the first block, hence every block's chain hash, unique: no
    # prefix-cache hit shrinks what the prompt holds.
    return f"Note {rng.randrange(1 << 30)}: " + PARAGRAPH * rng.randint(*long_paragraphs) + "\nSummarise the rules."


def messages(rng: random.Random) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    if rng.random() < 0.5:
        out.append({"role": "system", "content": SYSTEM})
    if rng.random() < 0.2:
        out += [{"role": "user", "content": rng.choice(QUESTIONS)}, {"role": "assistant", "content": "Sure."}]
    text = long_text(rng) if rng.random() < LONG_SHARE else rng.choice(QUESTIONS)
    out.append({"role": "user", "content": text})
    return out


@dataclass
class Ask:
    """What was asked, for checking the answer."""

    limit: int  # most completion tokens allowed
    stops: list[str] = field(default_factory=list)


def sampling(rng: random.Random, body: dict[str, Any]) -> Ask:
    r = rng.random()
    if r < 0.4:
        body["temperature"] = 0.0
    elif r < 0.85:
        body["temperature"] = rng.choice([0.6, 0.8, 1.0])
        if rng.random() < 0.5:
            body["top_p"] = 0.9
        if rng.random() < 0.3:
            body["top_k"] = 40
        if rng.random() < 0.5:
            body["seed"] = rng.randrange(1 << 31)
    if rng.random() < 0.2:
        body["ignore_eos"] = True
    max_tokens = rng.choice([None, 8, 16, 32, 48, 64])
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    ask = Ask(max_tokens or DEFAULT_MAX_TOKENS)
    if rng.random() < 0.15:
        ask.stops = rng.sample(STOPS, rng.randint(1, 3))
        body["stop"] = ask.stops
    return ask


def bad_inputs(capacity_tokens: int) -> list[tuple[str, bytes]]:
    """(name, raw HTTP request) pairs that must each be refused with a 4xx."""
    user = [{"role": "user", "content": "hi"}]

    def chat(obj: Any) -> bytes:
        return http_request("/v1/chat/completions", json.dumps(obj).encode(), JSON)

    def text(route: str, body: str) -> bytes:
        return http_request(route, body.encode(), JSON)

    def native(obj: Any) -> bytes:
        return http_request("/v1/generate", msgpack.packb(obj), MSGPACK)

    deep: Any = "x"
    for _ in range(100):
        deep = [deep]
    big_chat = {"messages": [{"role": "user", "content": "a" * (MAX_BODY_BYTES + 4096)}]}
    return [
        ("invalid_json", text("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}')),
        ("empty_body", text("/v1/completions", "")),
        ("not_utf8", http_request("/v1/chat/completions", b'{"messages": "\xff\xfe"}', JSON)),
        ("nan_temperature", text("/v1/chat/completions",
                                 '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')),
        ("deep_json_100", chat({"messages": user, "metadata": deep})),
        ("deep_json_100000", text("/v1/completions", "[" * 100_000 + "]" * 100_000)),
        ("deep_msgpack_100", native({"prompt": "hi", "stop": deep})),
        ("wrong_type_max_tokens", chat({"messages": user, "max_tokens": "ten"})),
        ("wrong_type_messages", chat({"messages": "hi"})),
        ("wrong_type_native_prompt", native({"prompt": 123})),
        ("wrong_type_stream", native({"prompt": "hi", "stream": "yes"})),
        ("huge_int_max_tokens", chat({"messages": user, "max_tokens": 10**40})),
        ("huge_int_seed", text("/v1/completions", '{"prompt": "hi", "seed": ' + str(2**64) + "}")),
        ("huge_int_5000_digits", text("/v1/completions", '{"prompt": "hi", "max_tokens": ' + "9" * 5000 + "}")),
        ("huge_int_native", native({"prompt": "hi", "max_tokens": 2**64 - 1})),
        ("negative_max_tokens", chat({"messages": user, "max_tokens": -1})),
        ("unknown_role", chat({"messages": [{"role": "wizard", "content": "hi"}]})),
        ("tool_role", chat({"messages": [{"role": "tool", "content": "hi"}]})),
        ("stop_17_chat", chat({"messages": user, "stop": [f"s{i}" for i in range(17)]})),
        ("stop_17_native", native({"prompt": "hi", "stop": [f"s{i}" for i in range(17)]})),
        ("bad_content_type_native", http_request("/v1/generate", json.dumps({"prompt": "hi"}).encode(), JSON)),
        ("msgpack_body_on_chat", http_request("/v1/chat/completions", msgpack.packb({"messages": user}), MSGPACK)),
        ("unknown_native_key", native({"prompt": "hi", "tempreature": 0.5})),
        ("no_prompt", native({"max_tokens": 4})),
        ("empty_messages", chat({"messages": []})),
        ("token_outside_vocab", native({"prompt": [10**7]})),
        ("n_2", chat({"messages": user, "n": 2})),
        ("tools", chat({"messages": user, "tools": [{"type": "function", "function": {"name": "f"}}]})),
        ("unknown_model", chat({"messages": user, "model": "gpt-17"})),
        ("prompt_over_kv_cache", native({"prompt": [42] * (capacity_tokens + 16)})),
        ("prompt_over_context", native({"prompt": [42] * 9000})),
        ("oversized_announced", http_request("/v1/chat/completions", b"{" + b" " * 1024, JSON,
                                             length=2 * MAX_BODY_BYTES)),
        ("oversized_sent", chat(big_chat)),
        ("wrong_method", http_request("/v1/chat/completions", b"", JSON, method="GET")),
        ("unknown_route", text("/v1/chat/complete", '{"messages": []}')),
    ]


# ----------------------------------------------------------------------------- bookkeeping
class Tally:
    """Every outcome, from every thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.served: Counter[str] = Counter()  # good requests answered in full and checked
        self.expected: Counter[str] = Counter()  # refusals, disconnects, drops that were meant
        self.unexpected: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.bad_status: Counter[str] = Counter()  # status codes the bad inputs got
        self.tokens = 0  # completion tokens reported in usage
        self.reached = 0  # requests the engine surely got (200, or 504 after queueing)
        self.maybe_reached = 0  # cut right after sending: the engine may or may not have got them
        self.latency: dict[str, list[float]] = {}
        self.slow: list[dict[str, Any]] = []  # each slow reader: KB it found after its pause, when dropped

    def ok(self, kind: str, tokens: int, seconds: float) -> None:
        with self.lock:
            self.served[kind] += 1
            self.tokens += tokens
            self.latency.setdefault(kind, []).append(seconds)

    def exp(self, name: str) -> None:
        with self.lock:
            self.expected[name] += 1

    def bad(self, name: str, detail: str = "") -> None:
        with self.lock:
            self.unexpected[name] += 1
            ex = self.examples.setdefault(name, [])
            if len(ex) < 3:
                ex.append(detail[:600])

    def add_reached(self, n: int = 1, maybe: bool = False) -> None:
        with self.lock:
            if maybe:
                self.maybe_reached += n
            else:
                self.reached += n


def check_native(frames: list[dict[str, Any]], ask: Ask) -> tuple[str | None, int, str]:
    """(problem, completion tokens, text) of a whole native stream."""
    if not frames or frames[0].get("type") != "start":
        return "no_start_frame", 0, ""
    terminal = [i for i, f in enumerate(frames) if f.get("type") in ("end", "error")]
    if not terminal:
        return "no_terminal_frame", 0, ""
    if len(terminal) > 1 or terminal[0] != len(frames) - 1:
        return "frames_after_terminal", 0, ""
    end = frames[-1]
    if end["type"] == "error":
        return f"error_frame_{end.get('status')}", 0, ""
    if any(f.get("type") != "delta" for f in frames[1:-1]):
        return "unknown_frame", 0, ""
    ids = sum((f["token_ids"] for f in frames[1:-1]), [])
    text = "".join(f["text"] for f in frames[1:-1])
    n = end["usage"]["completion_tokens"]
    if n != len(ids):
        return "usage_mismatch", n, text
    return check_common(end.get("finish_reason"), n, text, ask), n, text


def check_common(reason: str | None, n: int, text: str, ask: Ask) -> str | None:
    if reason not in ("stop", "length"):
        return f"finish_reason_{reason}"
    if n > ask.limit:
        return "over_max_tokens"
    if any(s in text for s in ask.stops):
        return "stop_string_emitted"
    return None


def check_sse(events: list[str], ask: Ask, chat: bool, usage: bool) -> tuple[str | None, int]:
    """(problem, completion tokens or 0 without usage) of a whole SSE stream."""
    if not events or events[-1] != "[DONE]":
        return "no_terminal_frame", 0
    if "[DONE]" in events[:-1]:
        return "frames_after_terminal", 0
    objs = [json.loads(e) for e in events[:-1]]
    if any("error" in o for o in objs):
        err = next(o["error"] for o in objs if "error" in o)
        return f"error_event_{err.get('type')}", 0
    chunks = [o for o in objs if o.get("choices")]
    if chat and (not chunks or chunks[0]["choices"][0]["delta"].get("role") != "assistant"):
        return "no_role_chunk", 0
    finals = [c for c in chunks if c["choices"][0].get("finish_reason") is not None]
    if len(finals) != 1 or finals[0] is not chunks[-1]:
        return "finish_chunks", 0
    text = "".join((c["choices"][0]["delta"].get("content") or "") if chat else c["choices"][0]["text"]
                   for c in chunks)
    n = 0
    if usage:
        tail = objs[-1]
        if tail.get("choices") != [] or not tail.get("usage"):
            return "no_usage_chunk", 0
        n = tail["usage"]["completion_tokens"]
    return check_common(finals[0]["choices"][0]["finish_reason"], n, text, ask), n


# --------------------------------------------------------------------------------- clients
KINDS = {
    "native_stream": 20, "native_whole": 6, "chat_stream": 20, "chat_whole": 12, "completion_stream": 10,
    "completion_whole": 10, "disconnect": 10, "slow_reader": 1, "bad_input": 11,
}


@dataclass
class Shared:
    sock: str
    tally: Tally
    stop: threading.Event
    bad: list[tuple[str, bytes]]
    t0: float
    duration_s: float
    slow_claimed: threading.Event = field(default_factory=threading.Event)
    bad_lock: threading.Lock = field(default_factory=threading.Lock)
    bad_next: int = 0

    def next_bad(self) -> tuple[str, bytes]:
        """The bad inputs in turn (shuffled once by seed), so that a short run still sends each."""
        with self.bad_lock:
            self.bad_next += 1
            return self.bad[(self.bad_next - 1) % len(self.bad)]


class Client(threading.Thread):
    def __init__(self, idx: int, seed: int, shared: Shared) -> None:
        super().__init__(name=f"soak-client-{idx}", daemon=True)
        self.rng = random.Random(f"{seed}-{idx}")
        self.s = shared
        self.t = shared.tally

    def run(self) -> None:
        kinds, weights = list(KINDS), list(KINDS.values())
        while not self.s.stop.is_set():
            kind = self.rng.choices(kinds, weights)[0]
            # at least one slow reader per run, once the load is established
            late = time.monotonic() - self.s.t0 > 0.2 * self.s.duration_s
            if kind == "slow_reader" or (late and not self.s.slow_claimed.is_set()):
                self.s.slow_claimed.set()
                kind = "slow_reader"
            try:
                getattr(self, kind)()
            except Exception as e:  # a connection failure on a good request, or a malformed answer
                self.t.bad(f"{kind}:{type(e).__name__}", repr(e))

    # ---------------------------------------------------------------------------- plumbing
    def post(self, route: str, body: bytes, ctype: str) -> tuple[UnixHTTPConnection, http.client.HTTPResponse]:
        conn = UnixHTTPConnection(self.s.sock)
        conn.request("POST", route, body=body, headers={"Content-Type": ctype})
        return conn, conn.getresponse()

    def status_ok(self, kind: str, r: http.client.HTTPResponse) -> bool:
        if r.status == 200:
            self.t.add_reached()
            return True
        if r.status == 504:  # timed out in the queue: the engine had it
            self.t.add_reached()
        self.t.bad(f"{kind}:http_{r.status}", r.read(300).decode("utf-8", "replace"))
        return False

    @staticmethod
    def cut(conn: UnixHTTPConnection) -> None:
        # shutdown first: the response object holds its own reference to the socket's file
        if conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        conn.close()

    def native_body(self, stream: bool) -> tuple[dict[str, Any], Ask]:
        rng = self.rng
        body: dict[str, Any] = {"stream": stream}
        if rng.random() < 0.7:
            body["messages"] = messages(rng)
        else:
            body["prompt"] = long_text(rng) if rng.random() < LONG_SHARE else rng.choice(COMPLETION_PROMPTS)
        return body, sampling(rng, body)

    def openai_body(self, chat: bool, stream: bool) -> tuple[dict[str, Any], Ask, bool]:
        rng = self.rng
        body: dict[str, Any] = {"model": "default"} if rng.random() < 0.3 else {}
        if chat:
            body["messages"] = messages(rng)
        else:
            body["prompt"] = long_text(rng) if rng.random() < LONG_SHARE else rng.choice(COMPLETION_PROMPTS)
        usage = False
        if stream:
            body["stream"] = True
            usage = rng.random() < 0.75
            if usage:
                body["stream_options"] = {"include_usage": True}
        return body, sampling(rng, body), usage

    # -------------------------------------------------------------------------- good kinds
    def native_stream(self, cut_after: int | None = None) -> None:
        kind = "native_stream"
        body, ask = self.native_body(stream=True)
        t0 = time.monotonic()
        conn, r = self.post("/v1/generate", msgpack.packb(body), MSGPACK)
        try:
            if not self.status_ok(kind, r):
                return
            if r.getheader("Content-Type") != NATIVE_STREAM:
                self.t.bad(f"{kind}:content_type", str(r.getheader("Content-Type")))
            unpacker = msgpack.Unpacker(raw=False, max_buffer_size=1 << 20)
            frames: list[dict[str, Any]] = []
            deltas = 0
            for chunk in read_chunks(r):
                unpacker.feed(chunk)
                for f in unpacker:
                    frames.append(f)
                    deltas += f.get("type") == "delta"
                if cut_after is not None and deltas >= cut_after and frames[-1].get("type") == "delta":
                    self.cut(conn)
                    self.t.exp("disconnect:mid_stream")
                    return
            problem, n, _ = check_native(frames, ask)
            if problem:
                self.t.bad(f"{kind}:{problem}", repr(frames[-2:])[:300])
            else:
                self.t.ok("disconnect" if cut_after else kind, n, time.monotonic() - t0)
                if cut_after:
                    self.t.exp("disconnect:finished_first")
        finally:
            conn.close()

    def native_whole(self) -> None:
        kind = "native_whole"
        body, ask = self.native_body(stream=False)
        t0 = time.monotonic()
        conn, r = self.post("/v1/generate", msgpack.packb(body), MSGPACK)
        try:
            if not self.status_ok(kind, r):
                return
            out = msgpack.unpackb(r.read(), raw=False)
            n = out["usage"]["completion_tokens"]
            problem = "usage_mismatch" if n != len(out["token_ids"]) else None
            problem = problem or check_common(out["finish_reason"], n, out["text"], ask)
            if problem:
                self.t.bad(f"{kind}:{problem}", repr(out)[:300])
            else:
                self.t.ok(kind, n, time.monotonic() - t0)
        finally:
            conn.close()

    def openai_stream(self, chat: bool, cut_after: int | None = None) -> None:
        kind = "chat_stream" if chat else "completion_stream"
        body, ask, usage = self.openai_body(chat, stream=True)
        route = "/v1/chat/completions" if chat else "/v1/completions"
        t0 = time.monotonic()
        conn, r = self.post(route, json.dumps(body).encode(), JSON)
        try:
            if not self.status_ok(kind, r):
                return
            events: list[str] = []
            pieces = 0
            for e in sse_events(read_chunks(r)):
                events.append(e)
                pieces += e != "[DONE]"
                if cut_after is not None and pieces > cut_after and e != "[DONE]":
                    self.cut(conn)
                    self.t.exp("disconnect:mid_stream")
                    return
            problem, n = check_sse(events, ask, chat, usage)
            if problem:
                self.t.bad(f"{kind}:{problem}", repr(events[-3:])[:300])
            else:
                self.t.ok("disconnect" if cut_after else kind, n, time.monotonic() - t0)
                if cut_after:
                    self.t.exp("disconnect:finished_first")
        finally:
            conn.close()

    def openai_whole(self, chat: bool) -> None:
        kind = "chat_whole" if chat else "completion_whole"
        body, ask, _ = self.openai_body(chat, stream=False)
        route = "/v1/chat/completions" if chat else "/v1/completions"
        t0 = time.monotonic()
        conn, r = self.post(route, json.dumps(body).encode(), JSON)
        try:
            if not self.status_ok(kind, r):
                return
            out = json.loads(r.read())
            choice = out["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            n = out["usage"]["completion_tokens"]
            problem = check_common(choice["finish_reason"], n, text, ask)
            if problem:
                self.t.bad(f"{kind}:{problem}", repr(out)[:300])
            else:
                self.t.ok(kind, n, time.monotonic() - t0)
        finally:
            conn.close()

    def chat_stream(self) -> None:
        self.openai_stream(chat=True)

    def completion_stream(self) -> None:
        self.openai_stream(chat=False)

    def chat_whole(self) -> None:
        self.openai_whole(chat=True)

    def completion_whole(self) -> None:
        self.openai_whole(chat=False)

    # ------------------------------------------------------------------------ hostile kinds
    def disconnect(self) -> None:
        rng = self.rng
        if rng.random() < 0.25:
            # Gone before any answer: the request is queued, being prepared, or not yet read.
            body = {"messages": messages(rng), "max_tokens": 64}
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect(self.s.sock)
                s.sendall(http_request("/v1/chat/completions", json.dumps(body).encode(), JSON))
                time.sleep(rng.uniform(0.0, 0.5))
            finally:
                s.close()
            self.t.add_reached(maybe=True)
            self.t.exp("disconnect:before_answer")
            return
        cut_after = rng.randint(1, 4)
        route = rng.choice(["native", "chat", "completion"])
        if route == "native":
            self.native_stream(cut_after)
        else:
            self.openai_stream(route == "chat", cut_after)

    def slow_reader(self) -> None:
        """Ask for a large stream (top-20 logprobs: ~1.4 KB a token) and read nothing. The
        pause lasts until the bytes queued for us stop growing for 3 x write_timeout_s (the
        daemon is blocked writing, or done) or the daemon hangs up: a blocked daemon must drop
        us within write_timeout_s (plus whatever its own buffer still took), not hold the
        request (and its KV blocks) until request_timeout_s."""
        body = {"messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
                "max_tokens": 400, "ignore_eos": True, "logprobs": True, "top_logprobs": 20, "stream": True}
        conn, r = self.post("/v1/chat/completions", json.dumps(body).encode(), JSON)
        try:
            if not self.status_ok("slow_reader", r):
                return
            assert conn.sock is not None
            poller = select.poll()
            poller.register(conn.sock, select.POLLRDHUP)
            queued, grew, hup = -1, time.monotonic(), None
            while time.monotonic() - grew < 3 * WRITE_TIMEOUT_S:
                now = time.monotonic()
                n = int.from_bytes(fcntl.ioctl(conn.sock, termios.FIONREAD, b"\0" * 4), sys.byteorder)
                if n != queued:
                    queued, grew = n, now
                if poller.poll(0):
                    hup = now - grew  # how long after its last write the daemon gave up on us
                    break
                time.sleep(0.05)
            got = bytearray()
            try:
                for chunk in read_chunks(r):
                    got += chunk
            except (http.client.IncompleteRead, ConnectionError, OSError):
                pass  # cut mid-chunk: what a dropped client sees
            with self.t.lock:
                self.t.slow.append({"kb": len(got) // 1024, "hup_after_last_write_s": hup and round(hup, 1)})
            if b"data: [DONE]" in got:
                # the whole answer fit in the socket buffers, or the request timed out first
                self.t.exp("slow_reader:timed_out" if b'"timeout"' in got else "slow_reader:not_blocked")
            elif hup is not None:
                self.t.exp("slow_reader:dropped")
            else:
                self.t.bad("slow_reader:not_dropped", f"no output for {3 * WRITE_TIMEOUT_S:g} s, still connected")
        finally:
            conn.close()

    def bad_input(self) -> None:
        name, data = self.s.next_bad()
        try:
            status, headers, body = raw_exchange(self.s.sock, data)
        except (OSError, TimeoutError) as e:
            self.t.bad(f"bad_input:{name}:{type(e).__name__}", repr(e))
            return
        if status is None or not 400 <= status < 500:
            self.t.bad(f"bad_input:{name}:http_{status}", body[:300].decode("utf-8", "replace"))
            return
        try:
            ctype = headers.get("content-type", "")
            obj = msgpack.unpackb(body, raw=False) if ctype.startswith(MSGPACK) else json.loads(body)
            err = obj["error"]
            if not (isinstance(err["type"], str) and isinstance(err["message"], str)):
                raise ValueError(err)
        except Exception as e:  # any shape other than {"error": {type, message}} is a finding
            self.t.bad(f"bad_input:{name}:error_body", f"{status} {e!r} {body[:200]!r}")
            return
        with self.t.lock:
            self.t.bad_status[f"{name}→{status}"] += 1
        self.t.exp(f"bad_input→{status}")


# -------------------------------------------------------------------------------- reloads
class Reloader(threading.Thread):
    """Every RELOAD_EVERY_S: config B, A, B, invalid, A, B, A, invalid, …"""

    def __init__(self, sock: str, cfg: Path, tally: Tally, stop: threading.Event, seed: int) -> None:
        super().__init__(name="soak-reloader", daemon=True)
        self.sock, self.cfg, self.t, self.stop = sock, cfg, tally, stop
        self.rng = random.Random(f"{seed}-reload")
        self.in_force = 0  # index into CONFIGS

    def write(self, text: str) -> None:
        tmp = self.cfg.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.cfg)  # a reload never reads half a file

    def run(self) -> None:
        n = 0
        while not self.stop.wait(RELOAD_EVERY_S):
            n += 1
            try:
                if n % INVALID_EVERY == 0:
                    self.invalid()
                else:
                    self.valid_reload()
            except Exception as e:
                self.t.bad(f"reload:{type(e).__name__}", repr(e))

    def valid_reload(self) -> None:
        nxt = 1 - self.in_force
        name, seqs, delay = CONFIGS[nxt]
        self.write(config_text(name, seqs, delay))
        status, body = call(self.sock, "POST", "/v1/reload", b"", JSON)
        out = json.loads(body)
        if status != 200 or not out.get("ok"):
            self.t.bad("reload:valid_refused", f"{status} {out}")
            return
        want = {"scheduler.max_num_seqs", "scheduler.max_queue_delay_ms"}
        if not want <= set(out.get("applied", [])) or out.get("restart_required"):
            self.t.bad("reload:applied", repr(out))
        st = get_json(self.sock, "/v1/status")
        sched = st["config"]["scheduler"]
        live = st["scheduler_in_force"]
        if (sched["max_num_seqs"], live["max_num_seqs"]) != (seqs, seqs) or float(live["max_queue_delay_ms"]) != delay:
            self.t.bad("reload:not_in_force", f"want {seqs}/{delay}, config {sched}, in force {live}")
            return
        self.in_force = nxt
        self.t.exp("reload:valid_applied")

    def invalid(self) -> None:
        before = get_json(self.sock, "/v1/status")
        self.write(self.rng.choice(INVALID_CONFIGS))
        status, body = call(self.sock, "POST", "/v1/reload", b"", JSON)
        out = json.loads(body)
        if status != 400 or out.get("ok") is not False or not out.get("error"):
            self.t.bad("reload:invalid_accepted", f"{status} {out}")
        after = get_json(self.sock, "/v1/status")
        if after["config"] != before["config"] or after["scheduler_in_force"] != before["scheduler_in_force"]:
            self.t.bad("reload:invalid_changed_config", f"{before['config']} -> {after['config']}")
        elif (after.get("last_reload") or {}).get("ok") is not False:
            self.t.bad("reload:invalid_not_reported", repr(after.get("last_reload")))
        else:
            self.t.exp("reload:invalid_refused")


# ---------------------------------------------------------------------------------- daemon
def start_daemon(tmp: Path) -> tuple[subprocess.Popen[bytes], str, Path, Path]:
    cfg = tmp / "inflightd.yaml"
    name, seqs, delay = CONFIGS[0]
    cfg.write_text(config_text(name, seqs, delay))
    sock = str(tmp / "inflightd.sock")
    log_path = tmp / "daemon.log"
    # Not systemd's child here, whatever the shell that runs us is.
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([INFLIGHTD, "serve", "--config", str(cfg), "--socket", sock],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 900  # a cold Numba cache compiles every kernel first
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited ({proc.returncode}) before it was ready:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the daemon was not ready within 900 s:\n{log_path.read_text()}")
        try:
            if call(sock, "GET", "/health", timeout=5)[0] == 200:
                return proc, sock, cfg, log_path
        except (FileNotFoundError, ConnectionRefusedError, OSError):
            pass  # not bound yet
        time.sleep(0.5)


def warm_up(sock: str, tally: Tally) -> None:
    """First-call costs (Numba dispatch, torch) out of the RSS baseline."""
    for route, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello!"}],
                                                  "max_tokens": 8}),
                        ("/v1/completions", {"prompt": PARAGRAPH * 6, "max_tokens": 8})):
        status, out = call(sock, "POST", route, json.dumps(body).encode(), timeout=120)
        if status != 200:
            raise SystemExit(f"warm-up request to {route} failed: {status} {out[:300]!r}")
        tally.add_reached()


def wait_idle(sock: str, timeout: float = 90.0) -> dict[str, Any]:
    """/v1/status once nothing runs or waits, and no block is held (2 s grace for the step that
    frees an aborted request's blocks); the last status seen when that does not happen."""
    deadline = time.monotonic() + timeout
    idle_since: float | None = None
    while True:
        st = get_json(sock, "/v1/status")
        idle = st["running"] == 0 and st["queue_depth"] == 0
        if idle and st["kv_blocks_used"] == 0:
            return st
        idle_since = (idle_since or time.monotonic()) if idle else None
        if time.monotonic() > deadline or (idle_since is not None and time.monotonic() - idle_since > 2.0):
            return st
        time.sleep(0.25)


def tracebacks(log: str) -> list[str]:
    """Each traceback in the daemon's log (a chain of them counts once, by its last exception),
    from the line before it (what was being done) to its exception line, with the daemon's own
    frames only (the rest is aiohttp and asyncio)."""
    out = []
    lines = log.splitlines() + [""]
    i = 0
    while i < len(lines):
        if not lines[i].startswith("Traceback"):
            i += 1
            continue
        ours: list[str] = []
        j, keep = i, False
        while True:
            j += 1
            while j < len(lines) and lines[j].startswith(" "):
                ln = lines[j].strip()
                if ln.startswith("File "):
                    keep = "/site-packages/" not in ln and "/lib/python" not in ln
                if keep and ln.strip("^~ "):
                    ours.append(ln)
                j += 1
            chained = lines[j + 1:j + 5]  # "", "During handling of the above…" / "The above…", "", "Traceback…"
            if len(chained) == 4 and chained[1].startswith(("During handling", "The above")) \
                    and chained[3].startswith("Traceback"):
                j += 4
                continue
            break
        out.append("\n".join([lines[i - 1] if i else "", *ours, lines[j] if j < len(lines) else ""]))
        i = j + 1
    return out


def rss_slope(samples: list[tuple[float, float]]) -> float | None:
    """MB per minute over the second half of the run (least squares): warm-up growth (caches,
    allocator pools) is mostly over by then, a leak is not."""
    half = [(t, v) for t, v in samples if t >= samples[-1][0] / 2]
    if len(half) < 3:
        return None
    mt = sum(t for t, _ in half) / len(half)
    mv = sum(v for _, v in half) / len(half)
    var = sum((t - mt) ** 2 for t, _ in half)
    return round(60 * sum((t - mt) * (v - mv) for t, v in half) / var, 1) if var else None


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# ------------------------------------------------------------------------------------ main
def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="inflightd-soak-"))
    tally = Tally()
    t_start = time.monotonic()
    proc, sock, cfg, log_path = start_daemon(tmp)
    ready_s = time.monotonic() - t_start
    pid = proc.pid
    died = False
    report: dict[str, Any] = {}
    try:
        warm_up(sock, tally)
        st0 = get_json(sock, "/v1/status")
        capacity = st0["kv_blocks_total"] * st0["kv_block_size"]
        size_long_prompts(sock, capacity)
        rss: list[tuple[float, float]] = [(0.0, rss_mb(pid))]

        stop = threading.Event()
        duration = args.minutes * 60
        t0 = time.monotonic()
        bad = bad_inputs(capacity)
        random.Random(args.seed).shuffle(bad)
        shared = Shared(sock, tally, stop, bad, t0, duration)
        clients = [Client(i, args.seed, shared) for i in range(args.clients)]
        reloader = Reloader(sock, cfg, tally, stop, args.seed)
        for c in clients:
            c.start()
        reloader.start()
        every = max(10.0, duration / 12)
        next_sample = t0 + every
        while time.monotonic() - t0 < duration:
            if proc.poll() is not None:
                died = True
                break
            if time.monotonic() >= next_sample:
                rss.append((time.monotonic() - t0, rss_mb(pid)))
                next_sample += every
            time.sleep(0.5)
        stop.set()
        load_s = time.monotonic() - t0
        for t in [*clients, reloader]:  # a request ends within request_timeout_s; a slow reader's pause is 15 s
            t.join(timeout=max(1.0, t0 + load_s + 120 - time.monotonic()))
        stuck = [t.name for t in [*clients, reloader] if t.is_alive()]
        if stuck:
            tally.bad("client_threads_stuck", ", ".join(stuck))

        alive = proc.poll() is None and not died
        final: dict[str, Any] = {}
        metrics: dict[str, float] = {}
        if alive:
            final = wait_idle(sock)
            rss.append((time.monotonic() - t0, rss_mb(pid)))
            metrics = parse_metrics(call(sock, "GET", "/metrics")[1].decode())
        else:
            tally.bad("daemon_died", f"exit code {proc.returncode}")

        # The engine ends every request it was given exactly once (stop, length or abort).
        m = {k: v for k, v in metrics.items() if k.startswith("inflightd:")}
        ended = {k.split('"')[1]: int(v) for k, v in m.items() if k.startswith("inflightd:request_success_total{")}
        rejected = {k.split('"')[1]: int(v) for k, v in m.items() if k.startswith("inflightd:request_rejected_total{")}
        engine_total = sum(ended.values())
        if alive and not tally.reached <= engine_total <= tally.reached + tally.maybe_reached:
            tally.bad("metrics_mismatch", f"engine ended {engine_total} requests, clients sent it "
                                          f"{tally.reached} (+ up to {tally.maybe_reached} cut right after sending)")
        leaked = None
        if final:
            leaked = final["kv_blocks_used"]
            if final["running"] or final["queue_depth"]:
                tally.bad("not_idle_after_load", f"running {final['running']}, queued {final['queue_depth']}")
            if leaked:
                tally.bad("kv_blocks_leaked", f"{leaked} of {final['kv_blocks_total']} blocks used when idle")
    finally:
        exit_code = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        else:
            exit_code = proc.returncode
    log = log_path.read_text(errors="replace")
    if exit_code != 0:
        tally.bad("daemon_exit", f"exit code {exit_code} after SIGTERM")
    for tb in tracebacks(log):
        lines = tb.splitlines()
        exc = lines[-1].split(":", 1)[0].rsplit(".", 1)[-1]
        frames = [ln for ln in lines if ln.startswith("File ")]
        # where in the daemon: the innermost of its own frames, e.g. http_io.py:send
        at = "" if not frames else "@" + Path(frames[-1].split('"')[1]).name + ":" + frames[-1].rsplit(" in ", 1)[-1]
        tally.bad(f"daemon_log_traceback:{exc}{at}", tb)

    rss_values = [v for _, v in rss]
    report = {
        "duration_min": round(load_s / 60, 2),
        "clients": args.clients,
        "seed": args.seed,
        "cpu": f"{cpu_model()} ({os.cpu_count()} CPUs)",
        "daemon_ready_s": round(ready_s, 1),
        "kv_cache": {"blocks": st0["kv_blocks_total"], "block_size": st0["kv_block_size"], "tokens": capacity},
        "requests_served": dict(sorted(tally.served.items())),
        "requests_served_total": sum(tally.served.values()),
        "latency_s_p50_p95": {k: [round(pct(v, 50), 2), round(pct(v, 95), 2)]
                              for k, v in sorted(tally.latency.items())},
        "tokens_generated": {"client_usage": tally.tokens,
                             "daemon": int(m.get("inflightd:generation_tokens_total", 0))},
        "expected": dict(sorted(tally.expected.items())),
        "bad_inputs_by_status": dict(sorted(tally.bad_status.items())),
        "bad_input_kinds": len(bad),
        "unexpected": dict(sorted(tally.unexpected.items())),
        "unexpected_examples": tally.examples,
        "daemon_metrics": {
            "request_success": ended,
            "request_rejected": rejected,
            "engine_ended_vs_sent": [engine_total, tally.reached, tally.maybe_reached],
            "preemptions": int(m.get("inflightd:num_preemptions_total", 0)),
            "prefix_hit_rate": round(final.get("prefix_hit_rate", 0.0), 3) if final else None,
            "engine_steps": int(m.get("inflightd:engine_steps_total", 0)),
        },
        "slow_clients_dropped_in_log": log.count("(limits.write_timeout_s): dropped"),
        "slow_readers": tally.slow,
        "rss_mb": {"start": round(rss_values[0], 1), "end": round(rss_values[-1], 1), "max": round(max(rss_values), 1),
                   "growth_mb_per_min_second_half": rss_slope(rss),
                   "samples": [[round(t), round(v, 1)] for t, v in rss]},
        "kv_blocks_leaked": leaked,
        "daemon_alive_at_end": not died and leaked is not None,
        "daemon_exit_code": exit_code,
    }
    report["passed"] = not tally.unexpected and leaked == 0 and report["daemon_alive_at_end"]
    if report["passed"]:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        report["daemon_log"] = str(log_path)
    return report


def print_report(r: dict[str, Any]) -> None:
    def kv(d: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"

    dm = r["daemon_metrics"]
    rss = r["rss_mb"]
    print(f"inflightd soak: {r['duration_min']} min, {r['clients']} clients, seed {r['seed']}; CPU {r['cpu']}; "
          f"daemon ready in {r['daemon_ready_s']} s")
    print(f"KV cache: {r['kv_cache']['blocks']} blocks x {r['kv_cache']['block_size']} = "
          f"{r['kv_cache']['tokens']} tokens")
    print(f"served ({r['requests_served_total']}): {kv(r['requests_served'])}")
    print("latency s p50/p95: " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in r["latency_s_p50_p95"].items()))
    print(f"tokens generated: {r['tokens_generated']['daemon']} (daemon), "
          f"{r['tokens_generated']['client_usage']} in the usage clients saw")
    print(f"expected: {kv(r['expected'])}")
    statuses = Counter(int(k.rsplit("→", 1)[1]) for k in r["bad_inputs_by_status"])
    print(f"bad inputs: {len(r['bad_inputs_by_status'])} of {r['bad_input_kinds']} kinds sent, each refused "
          f"(kinds by status: {kv(dict(sorted(statuses.items())))})")
    print(f"UNEXPECTED: {kv(r['unexpected'])}")
    for name, ex in r["unexpected_examples"].items():
        print(f"  {name}: {ex[0]!r}")
    ended, sent, maybe = dm["engine_ended_vs_sent"]
    print(f"daemon: ended {kv(dm['request_success'])} ({ended}; clients sent {sent} + {maybe} cut at once); "
          f"rejected {kv(dm['request_rejected'])}; preemptions {dm['preemptions']}; "
          f"prefix hit rate {dm['prefix_hit_rate']}; steps {dm['engine_steps']}; "
          f"slow clients dropped (log) {r['slow_clients_dropped_in_log']}")
    print("slow readers (KB found after the pause, s from the daemon's last write to its hang-up): "
          + (", ".join(f"{x['kb']} KB/{x['hup_after_last_write_s']} s" for x in r["slow_readers"]) or "none"))
    print(f"RSS MB: start {rss['start']}, end {rss['end']}, max {rss['max']}, growth over the second half "
          f"{rss['growth_mb_per_min_second_half']} MB/min; samples (s, MB) {rss['samples']}")
    print(f"KV blocks leaked: {r['kv_blocks_leaked']}; daemon alive at end: {r['daemon_alive_at_end']}; "
          f"exit code after SIGTERM: {r['daemon_exit_code']}")
    if "daemon_log" in r:
        print(f"daemon log kept: {r['daemon_log']}")
    print("PASS" if r["passed"] else "FAIL")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="how long the load runs (default 30)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    ap.add_argument("--seed", type=int, default=0, help="seeds each client's choice of requests")
    ap.add_argument("--json", metavar="PATH", help="also write the report here as JSON")
    args = ap.parse_args()
    report = run(args)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
