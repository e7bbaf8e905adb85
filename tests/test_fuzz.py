"""Fuzzing the request decoders and every HTTP route with hypothesis.

In-process (fast, not marked slow): `decode_json` and `decode_msgpack` get random bytes, encoded
values, truncated or padded encodings and bodies nested 100,000 levels deep; `parse_native`,
`parse_chat` and `parse_completion` get arbitrary JSON- and msgpack-like values (`st.recursive`) and
valid requests with fields mutated: wrong types, integers such as 10**400, -2**63-1 and 2**64,
nan/inf/1e-308/1e308, strings of thousands of characters, nested containers, unknown keys, odd
roles and content parts, lists of many stop strings, logit_bias keys of thousands of digits. Each
must return or raise `ProtocolError` with status 400, and an accepted request carries its checked
`SamplingParams`, which passes `check_vocab` or raises `SamplingParamsError`: any other exception is a
500 in the daemon.

Over a real daemon (slow): one `inflightd serve` with tiny limits (3 tokens by default, a
256-token context) gets the same kinds of bodies on POST /v1/generate (msgpack, also with wrong
or missing Content-Types), /v1/chat/completions, /v1/completions, /v1/tokenize and
/v1/detokenize, some chunked, some cut off by the client once the status line arrived; GETs of
/health, /metrics, /v1/status and /v1/models; odd methods and paths. Every response must be
under 500, every error must carry `{"error": {"type", "message"}}` (msgpack on /v1/generate,
JSON elsewhere), every stream must end with its terminal frame, and a connection the daemon keeps
open must serve the next request. Afterwards the daemon must still serve a plain request, hold no
request and no KV block, have logged no traceback, and exit 0 on SIGTERM.

By default each test runs 60 to 200 examples, about 1,000 in all (10 s on this project's quiet
2-core machine, 30-60 s while other jobs load it, the daemon's start included). A long run raises
every test's example count:

    INFLIGHTD_FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest -q tests/test_fuzz.py

(10,000 per test, ~90,000 cases); add -s to see the cases run and the outcomes (HTTP statuses)
seen per target, printed at the end.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from daemon_util import Daemon, Response, UnixHTTPConnection, start_daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inflightd.checks import is_int
from inflightd.engine.sampling_params import SEED_MAX, SEED_MIN, SamplingParams, SamplingParamsError
from inflightd.server.protocol import NATIVE_STREAM_TYPE, ProtocolError
from inflightd.server.requests import (
    MAX_DEPTH,
    MAX_STOP,
    ROLES,
    GenerateRequest,
    decode_json,
    decode_msgpack,
    parse_chat,
    parse_completion,
    parse_native,
)

# Hypothesis warns when it describes a strategy that holds the 100 kB bodies and 4300-digit
# integers below; sampled_from still beats hiding them behind a map, which would show a
# falsifying example as an index instead of the value.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

LONG_RUN = int(os.environ.get("INFLIGHTD_FUZZ_EXAMPLES") or 0)
VOCAB = 49152  # SmolLM2's vocabulary: ids at or above it are refused
MAX_BODY = 1 << 20  # limits.max_body_bytes' default, which the fuzz daemon keeps

# Cases run and outcomes seen per target, printed at the end of the module (visible with -s).
CASES: Counter[str] = Counter()
OUTCOMES: Counter[tuple[str, str]] = Counter()


def fuzz_settings(default: int) -> settings:
    return settings(
        max_examples=max(default, LONG_RUN),
        deadline=None,  # a request that waits on a prefill is not a flaky test
        derandomize=False,
        database=None,  # nothing written into the repository
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.large_base_example],
    )


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print(f"\nfuzz: {sum(CASES.values())} cases")
    for target in sorted(CASES):
        seen = ", ".join(f"{k}: {n}" for (t, k), n in sorted(OUTCOMES.items()) if t == target)
        print(f"  {target}: {CASES[target]} cases ({seen})")


# ------------------------------------------------------------------------------ strategies
INT_EDGES = [
    0, 1, -1, 2, 4, 5, 20, 21, 255, 256, VOCAB - 1, VOCAB, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63,
    -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, -(2**64), 10**400, -(10**400), 10**4299,  # 4300 digits: JSON's limit
]
FLOAT_EDGES = [math.nan, math.inf, -math.inf, 1e-308, 1e308, 5e-324, -0.0, 0.0, 1e-5, 0.5, 1.0, 1.5, 2.0000001,
               -2.0000001, 100.0, 100.00001, -100.00001]
SPECIAL_STRINGS = [
    "", " ", "user", "assistant", "system", "developer", "tool", "function", "text", "image_url", "default", "none",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "{{ raise_exception('x') }}", "{% for %}", "\x00", "\ufeff",
    "\u202e", "0", "-1", "1e309", "NaN", "\r\n", "\U0001f600",
]
LONG_STRINGS = ["a" * 5000, "hello " * 400, "é" * 3000, "9" * 5000, "\U0001f600" * 1000, "<|im_end|>" * 300]
# Lone surrogates: JSON's "\ud800" decodes to one, msgpack cannot carry them.
SURROGATE_STRINGS = ["\ud800", "\udfff", "a\ud83d", "\ude00b", "\udcff" * 3]

JSON_INTS = st.integers() | st.sampled_from(INT_EDGES)
PACK_INTS = st.integers(-(2**63), 2**64 - 1) | st.sampled_from([i for i in INT_EDGES if -(2**63) <= i < 2**64])
FLOATS = st.floats() | st.sampled_from(FLOAT_EDGES)
TEXTS = st.text(max_size=20) | st.sampled_from(SPECIAL_STRINGS) | st.sampled_from(LONG_STRINGS)
JSON_TEXTS = TEXTS | st.sampled_from(SURROGATE_STRINGS)

NATIVE_KEYS = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
               "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids", "priority", "stream",
               "ignore_eos", "logprobs"]
OPENAI_KEYS = ["model", "n", "logit_bias", "user", "stream_options", "max_completion_tokens", "top_logprobs",
               "response_format", "tools", "tool_choice", "functions", "function_call", "audio", "prediction",
               "modalities", "echo", "suffix", "best_of"]
UNKNOWN_KEYS = ["max_tokenz", "Prompt", "", "__class__", "extra", "metadata", "role", "content"]
KEYS = st.sampled_from(NATIVE_KEYS + OPENAI_KEYS + UNKNOWN_KEYS)
# One value of every JSON type, containers included: a field that expects a string or a number
# and meets a list or a map is where type confusion (e.g. hashing it) shows.
WRONG_TYPES = [None, True, False, 0, -1, 1.5, math.nan, "", "x", [], {}, ["user"], [[]], {"type": "text"}, {"": None}]
WRONG = st.sampled_from(WRONG_TYPES).map(copy.deepcopy)  # fresh containers: a body may be edited later


def nested(depth: int, inner: Any = 0, kind: str = "list") -> Any:
    for _ in range(depth):
        inner = [inner] if kind == "list" else {"a": inner}
    return inner


DEEP_VALUES = [nested(8), nested(MAX_DEPTH - 2), nested(MAX_DEPTH), nested(MAX_DEPTH + 5),
               nested(MAX_DEPTH + 5, kind="dict"), nested(200, "x")]


def json_like(ints: st.SearchStrategy[int], texts: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | ints | FLOATS | texts | WRONG
    keys = KEYS | texts
    return st.recursive(
        leaves, lambda kids: st.lists(kids, max_size=5) | st.dictionaries(keys, kids, max_size=5), max_leaves=20
    )


JSON_VALUES = json_like(JSON_INTS, JSON_TEXTS)
# What msgpack carries beyond JSON: bytes, extension types, timestamps, non-string map keys.
PACK_LEAVES = (st.none() | st.booleans() | PACK_INTS | FLOATS | TEXTS | WRONG | st.binary(max_size=20)
               | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
               | st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 999_999_999)))
PACK_VALUES = st.recursive(
    PACK_LEAVES,
    lambda kids: st.lists(kids, max_size=5)
    | st.dictionaries(KEYS | TEXTS | PACK_INTS | st.binary(max_size=4) | st.none() | st.booleans(), kids, max_size=5),
    max_leaves=20,
)

SHORT_TEXT = st.text(min_size=1, max_size=24)
TOKEN_IDS = st.lists(st.integers(0, VOCAB - 1) | st.sampled_from([0, 1, 2]), min_size=1, max_size=16)
TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=12)})
VALID_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(sorted(ROLES)), "content": SHORT_TEXT | st.lists(TEXT_PART, min_size=1, max_size=3)},
    optional={"name": st.text(max_size=8)},
)
VALID_MESSAGES = st.lists(VALID_MESSAGE, min_size=1, max_size=3)


def odd_messages(values: st.SearchStrategy[Any], texts: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    role = st.sampled_from(sorted(ROLES) + ["tool", "function", "", "USER", "bot", "ipython"]) | WRONG | values
    part = (st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio", "file", ""]) | WRONG
                                   | values, "text": texts | WRONG | values})
            | st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
                {"url": st.just("data:image/png;base64,AAAA")})})
            | values)
    content = texts | WRONG | st.lists(part, max_size=4) | values
    message = st.fixed_dictionaries(
        {"role": role, "content": content},
        optional={"name": texts | WRONG | values, "tool_calls": WRONG | values, "tool_call_id": texts,
                  "extra": values},
    ) | WRONG | values
    return st.lists(VALID_MESSAGE | message, max_size=4) | values


ODD_LOGIT_BIAS_KEYS = ["1" * 5000, "0" * 20, "9" * 21, "00000000000000000001", "-1", "1.5", " 1", "1 ", "１", "٣",
                       "", "49152", "49151", "1e3", "0x10", "+1", "1_000"]


def odd_logit_bias(ints: st.SearchStrategy[int], texts: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    key = st.sampled_from(ODD_LOGIT_BIAS_KEYS) | st.integers(0, 10**30).map(str) | texts
    return st.dictionaries(key, FLOATS | ints | st.sampled_from([-100, 100, -101, 101]) | texts, max_size=4)


def odd_value(ints: st.SearchStrategy[int], texts: st.SearchStrategy[str], values: st.SearchStrategy[Any]
              ) -> st.SearchStrategy[Any]:
    return st.one_of(
        WRONG,
        values,
        ints,
        FLOATS,
        texts,
        st.sampled_from(DEEP_VALUES),
        st.lists(SHORT_TEXT, min_size=MAX_STOP - 1, max_size=3 * MAX_STOP),  # many stop strings
        st.lists(st.sampled_from(LONG_STRINGS), min_size=1, max_size=3),
        odd_logit_bias(ints, texts),
        st.lists(ints, max_size=8),
        st.booleans(),
    )


NUMERIC_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "seed", "priority", "logprobs", "top_logprobs", "n", "best_of",
                  "max_completion_tokens"]
NUMBERS = st.one_of(st.integers(-300, 300), st.floats(-200, 200), st.sampled_from(INT_EDGES + FLOAT_EDGES),
                    st.sampled_from([0.009, 0.01, 100.1, 1e-6, 2.5, -2.5, 21, 6, SEED_MAX, SEED_MAX + 1, SEED_MIN,
                                     SEED_MIN - 1]))
SPECIAL_IDS = st.sampled_from([0, 1, 2])  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|> (its EOS)

COMMON_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.integers(1, 4),
    "temperature": st.sampled_from([0, 0.0, 0.7, 1]) | st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "top_k": st.integers(-1, 100),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(0.5, 2),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "seed": st.integers(SEED_MIN, SEED_MAX),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1) | SPECIAL_IDS, max_size=4),
    "ignore_eos": st.booleans(),
    "priority": st.integers(-(2**63), 2**63 - 1),
    "stream": st.booleans(),
}
NATIVE_FIELDS = COMMON_FIELDS | {"stop": st.lists(SHORT_TEXT, max_size=MAX_STOP), "logprobs": st.integers(0, 20)}
OPENAI_FIELDS = COMMON_FIELDS | {
    "stop": SHORT_TEXT | st.lists(SHORT_TEXT, max_size=MAX_STOP),
    "model": st.sampled_from([None, "", "default", "SmolLM2-135M-Instruct.Q4_1", "gpt-4o"]),
    "n": st.just(1),
    "logit_bias": st.dictionaries((st.integers(0, VOCAB - 1) | SPECIAL_IDS).map(str), st.floats(-100, 100)
                                  | st.sampled_from([-100, 100]), max_size=4),
    "user": st.text(max_size=8),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
}
CHAT_FIELDS = OPENAI_FIELDS | {
    "max_completion_tokens": st.integers(1, 4),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "response_format": st.just({"type": "text"}),
    "tools": st.just([]),
    "tool_choice": st.just("none"),
}
COMPLETION_FIELDS = OPENAI_FIELDS | {
    "logprobs": st.integers(0, 5),
    "echo": st.just(False),
    "suffix": st.just(""),
    "best_of": st.just(1),
}
FIELDS = {"native": NATIVE_FIELDS, "chat": CHAT_FIELDS, "completion": COMPLETION_FIELDS}


def cheap(body: Any) -> Any:
    """Keep accepted requests short: a mutated max_tokens that fits the 256-token context would
    otherwise generate up to 250 tokens (larger ones are refused, and stay)."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            v = body.get(key)
            if is_int(v) and 4 < v < 1000:
                body[key] = v % 4 + 1
    return body


@st.composite
def requests(draw: st.DrawFn, kind: str, wire: str = "json") -> dict[Any, Any]:
    """A valid request of `kind` with up to three fields mutated or dropped. `wire` "msgpack"
    keeps every value packable (64-bit integers, no lone surrogates)."""
    ints, texts = (PACK_INTS, TEXTS) if wire == "msgpack" else (JSON_INTS, JSON_TEXTS)
    values = PACK_VALUES if wire == "msgpack" else JSON_VALUES
    body: dict[Any, Any] = {}
    prompt = SHORT_TEXT | TOKEN_IDS
    if kind == "chat" or (kind == "native" and draw(st.booleans())):
        body["messages"] = draw(VALID_MESSAGES)
    elif kind == "completion":
        body["prompt"] = draw(prompt | st.lists(prompt, min_size=1, max_size=1))
    else:
        body["prompt"] = draw(prompt)
    fields = FIELDS[kind]
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=6, unique=True)):
        body[key] = draw(fields[key])
    for _ in range(draw(st.integers(0, 3))):
        # Mostly a field of this route (so that range checks past the type checks are reached).
        key = draw(st.sampled_from(sorted(fields)) | KEYS | (texts if wire == "json" else texts | ints))
        how = draw(st.sampled_from(["value", "value", "number", "in_message", "in_message", "messages", "drop"]))
        messages = body.get("messages")
        if how == "in_message" and isinstance(messages, list) and messages and isinstance(messages[-1], dict):
            # One field deep inside an otherwise valid conversation: the role, the content, a part.
            message = messages[draw(st.integers(0, len(messages) - 1))]
            if not isinstance(message, dict):
                continue
            field = draw(st.sampled_from(["role", "content", "name", "tool_calls", "part"]))
            odd = draw(WRONG | odd_value(ints, texts, values))
            parts = message.get("content")
            if field == "part" and isinstance(parts, list) and parts and isinstance(parts[0], dict):
                parts[0][draw(st.sampled_from(["type", "text"]))] = odd
            else:
                message[field] = odd
        elif how == "number":
            # A plausible number just outside (or inside) a numeric field's range: it passes the
            # parser's type check and meets SamplingParams' or the scheduler's range checks.
            number = NUMBERS if wire == "json" else NUMBERS.filter(lambda v: not is_int(v) or -(2**63) <= v < 2**64)
            body[draw(st.sampled_from(NUMERIC_FIELDS))] = draw(number)
        elif how == "drop":
            body.pop(key, None)
        elif how == "messages":
            body["messages"] = draw(odd_messages(values, texts))
        else:
            body[key] = draw(odd_value(ints, texts, values))
    return cheap(body)


def truncations(data: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """An encoding cut short, with garbage after it, or with one byte changed."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        b = draw(data)
        how = draw(st.sampled_from(["cut", "append", "flip"]))
        if how == "cut" and b:
            return b[: draw(st.integers(0, len(b) - 1))]
        if how == "append":
            return b + draw(st.binary(min_size=1, max_size=8))
        if b:
            i = draw(st.integers(0, len(b) - 1))
            return b[:i] + bytes([draw(st.integers(0, 255))]) + b[i + 1:]
        return b

    return mutate()


SPECIAL_JSON = [
    b"", b" ", b"null", b"[]", b"{}", b"NaN", b"Infinity", b"-Infinity", b"1e999", b'"\\ud800"', b"\xef\xbb\xbf{}",
    b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000,
    b"[" * MAX_DEPTH + b"]" * MAX_DEPTH, b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1),
    b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",  # an integer of over 4300 digits
    b'{"prompt": "x", "max_tokens": 1e400}', b'{"prompt": "x", "max_tokens": 3.0}', b'{"prompt": "x", "seed": -0}',
    b'{"prompt": "hi"}{"prompt": "hi"}', b'{"prompt": "hi", "prompt": 5}', b'{"prompt": "\xff\xfe"}',
    b'{"prompt": "\\ud800\\udc00", "max_tokens": 1}', b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
    '{"prompt": "hi", "max_tokens": 1}'.encode("utf-16"), '{"prompt": "hi", "max_tokens": 1}'.encode("utf-32"),
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stop": [' + b'"a",' * 5000 + b'"b"]}',
    b'{"prompt": "x", "logit_bias": {"' + b"1" * 5000 + b'": 1}}', b'{"tokens": [' + b"1," * 20000 + b"1]}",
]
SPECIAL_MSGPACK = [
    b"", b"\xc1", b"\x80", b"\x90", b"\xc0", b"\x81\xa6prompt\xa0", b"\x81\x91\x01\xa1x", b"\x81\x80\xa1x",
    b"\x81\xa2\xff\xfe\x01", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
    b"\xdb\xff\xff\xff\xff", b"\xd4\xff\x00", b"\xd6\xff\x00\x00\x00\x00", b"\xc7\x03\xff\x00\x00\x00",
    b"\x91" * 100_000 + b"\xc0", b"\x81\xa1a" * 100_000 + b"\xc0", b"\x91" * MAX_DEPTH + b"\xc0",
    b"\x91" * (MAX_DEPTH + 1) + b"\xc0", b"\x81\xa6prompt\xa2hi\x81\xa6prompt\xa2hi",
    b"\x82\xa6prompt\xa2hi\xaamax_tokens\xcf" + b"\xff" * 8, b"\x82\xa6prompt\xa2hi\xa4seed\xd3\x80" + b"\x00" * 7,
    b"\x82\xa6prompt\xa2hi\xabtemperature\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",
    b"\x81\xa6prompt\x91\xcf" + b"\xff" * 8,
]


def dump_json(value: Any, ascii_only: bool = True) -> bytes:
    # Python writes nan/inf as NaN/Infinity, which its own parser (the daemon's) reads back.
    text = json.dumps(value, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8


JSON_REQUESTS = requests("chat") | requests("completion")
JSON_BODIES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(SPECIAL_JSON),
    st.builds(dump_json, JSON_VALUES | JSON_REQUESTS, st.booleans()),
    truncations(st.builds(dump_json, JSON_REQUESTS)),
)
MSGPACK_BODIES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(SPECIAL_MSGPACK),
    st.builds(msgpack.packb, PACK_VALUES | requests("native", "msgpack")),
    truncations(st.builds(msgpack.packb, requests("native", "msgpack"))),
)


# ------------------------------------------------------------------------------ in-process
def call(target: str, fn: Callable[[Any], Any], arg: Any) -> tuple[bool, Any]:
    """(True, result), or (False, None) for a ProtocolError with a 400; any other exception
    propagates, failing the test with hypothesis' minimal example."""
    CASES[target] += 1
    try:
        out = fn(arg)
    except ProtocolError as e:
        OUTCOMES[(target, str(e.status))] += 1
        assert e.status == 400, f"{target}: status {e.status}: {e.message}"
        assert isinstance(e.message, str) and e.message and e.type
        return False, None
    OUTCOMES[(target, "ok")] += 1
    return True, out


def check_accepted(req: GenerateRequest) -> None:
    assert isinstance(req, GenerateRequest)
    assert (req.prompt is None) != (req.messages is None)
    if isinstance(req.prompt, str):
        assert req.prompt
    elif req.prompt is not None:
        assert req.prompt and all(is_int(t) and 0 <= t < 2**63 for t in req.prompt)
    for m in req.messages or []:
        assert m["role"] in ROLES - {"developer"} and isinstance(m["content"], str)
    assert req.max_tokens is None or (is_int(req.max_tokens) and req.max_tokens >= 1)
    assert is_int(req.priority) and -(2**63) <= req.priority < 2**63
    assert isinstance(req.params, SamplingParams)  # checked when parsed
    assert req.params.max_tokens == (req.max_tokens or 1)
    try:
        req.params.check_vocab(VOCAB)
    except SamplingParamsError as e:
        OUTCOMES[("sampling_params", "SamplingParamsError")] += 1
        assert str(e)
    else:
        OUTCOMES[("sampling_params", "ok")] += 1
    CASES["sampling_params"] += 1


def parse_checked(target: str, parse: Callable[[Any], GenerateRequest], obj: Any) -> None:
    ok, req = call(target, parse, obj)
    if ok:
        check_accepted(req)


@fuzz_settings(100)
@given(JSON_BODIES)
def test_decode_json_then_parse(body: bytes) -> None:
    ok, obj = call("decode_json", decode_json, body)
    if ok:
        parse_checked("parse_chat", parse_chat, obj)
        parse_checked("parse_completion", parse_completion, obj)


@fuzz_settings(100)
@given(MSGPACK_BODIES)
def test_decode_msgpack_then_parse(body: bytes) -> None:
    ok, obj = call("decode_msgpack", decode_msgpack, body)
    if ok:
        parse_checked("parse_native", parse_native, obj)


@fuzz_settings(200)
@given(requests("native") | requests("native", "msgpack") | PACK_VALUES | JSON_VALUES)
def test_parse_native(obj: Any) -> None:
    parse_checked("parse_native", parse_native, obj)


@fuzz_settings(200)
@given(requests("chat") | JSON_VALUES)
def test_parse_chat(obj: Any) -> None:
    parse_checked("parse_chat", parse_chat, obj)


@fuzz_settings(200)
@given(requests("completion") | JSON_VALUES)
def test_parse_completion(obj: Any) -> None:
    parse_checked("parse_completion", parse_completion, obj)


# ------------------------------------------------------------------------------ over the wire
FUZZ_CONFIG = """\
model: {path: default, dtype: float32, device: cpu}
scheduler: {max_queue_delay_ms: 0, max_num_seqs: 8, max_num_batched_tokens: 512}
kv_cache: {block_size: 16, memory: 64MiB}
limits: {max_model_len: 256, default_max_tokens: 3, read_timeout_s: 5, write_timeout_s: 5}
"""


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory, default_gguf: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("fuzz-daemon"), config=FUZZ_CONFIG)
    yield d
    alive = d.proc.poll() is None
    rc = d.stop()
    assert alive, f"the daemon died during the fuzzing ({d.proc.returncode}); log:\n{d.log()[-5000:]}"
    assert rc == 0, f"daemon exited {rc}; log:\n{d.log()[-5000:]}"


@dataclass(frozen=True)
class Body:
    """What a case sends: `value` encoded by the route's codec, or `raw` bytes as they are."""

    value: Any = None
    raw: bytes | None = None
    content_type: str | None = "application/json"
    # A Content-Length over limits.max_body_bytes, sent with a short body: the daemon must answer
    # 413 from the header alone (uploading a real MiB would race its early close).
    declared_length: int | None = None
    chunked: bool = False  # Transfer-Encoding: chunked, in two chunks
    # Close the connection once a 200's status line arrived, unread: the request is aborted
    # mid-stream, and its KV blocks must still come back (checked at the end).
    hang_up: bool = False


def send(d: Daemon, method: str, path: str, body: Body | None, *, msgpack_route: bool = False) -> Response:
    """One request; then, when the daemon keeps the connection open, a GET /health on the same
    connection, which must find it in a clean state (a body left unread would be parsed as the
    next request)."""
    conn = UnixHTTPConnection(d.socket_path, timeout=60)
    try:
        headers: dict[str, str] = {}
        data: bytes | None = None
        chunked = False
        if body is not None:
            if body.raw is not None:
                data = body.raw
            elif msgpack_route:
                data = msgpack.packb(body.value)
            else:
                data = dump_json(body.value)
            if body.content_type is not None:
                headers["Content-Type"] = body.content_type
            if body.declared_length is not None:
                headers["Content-Length"] = str(body.declared_length)
            chunked = body.chunked and body.declared_length is None
        if chunked and data is not None:
            half = len(data) // 2
            conn.request(method, path, body=iter([data[:half], data[half:]]), headers=headers, encode_chunked=True)
        else:
            conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        if r.status == 200 and body is not None and body.hang_up:
            assert conn.sock is not None
            conn.sock.shutdown(socket.SHUT_RDWR)
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, b"")
        first = Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        # After a Content-Length that overstates the body, whatever the client sends next is the
        # rest of that body: the connection is the client's mess, not the daemon's.
        if not r.will_close and not (body is not None and body.declared_length is not None):
            conn.request("GET", "/health")
            r2 = conn.getresponse()
            again = r2.read()
            assert r2.status == 200 and json.loads(again) == {"status": "ok"}, (
                f"after {method} {path} ({first.status}), GET /health on that connection: {r2.status} {again[:300]!r}"
            )
        return first
    finally:
        conn.close()


def error_of(r: Response, *, expect: str | None) -> dict[str, Any]:
    """The `error` object of an error response; `expect` names the codec the route must use."""
    ctype = r.headers.get("content-type", "").split(";")[0].strip()
    if expect is not None:
        assert ctype == expect, f"error {r.status} with Content-Type {ctype!r}, wanted {expect}: {r.body[:300]!r}"
    if ctype == "application/msgpack":
        obj = msgpack.unpackb(r.body, raw=False)
    else:
        assert ctype == "application/json", f"error {r.status} with Content-Type {ctype!r}: {r.body[:300]!r}"
        obj = json.loads(r.body)
    assert isinstance(obj, dict) and isinstance(obj.get("error"), dict), (r.status, r.body[:300])
    err = obj["error"]
    assert isinstance(err.get("type"), str) and err["type"], err
    assert isinstance(err.get("message"), str) and err["message"].strip(), err
    return err


def record(target: str, r: Response) -> None:
    CASES[target] += 1
    OUTCOMES[(target, str(r.status))] += 1
    assert r.status < 500, f"{target}: {r.status} {r.body[:1000]!r}"


def check_native(r: Response, body: Body) -> None:
    record("POST /v1/generate", r)
    if r.status >= 400:
        error_of(r, expect="application/msgpack")
        return
    assert r.status == 200, (r.status, r.body[:300])
    if body.hang_up:
        return
    ctype = r.headers.get("content-type", "")
    value = body.value if body.raw is None else None
    if ctype == NATIVE_STREAM_TYPE:
        assert not (isinstance(value, dict) and value.get("stream") is False), "streamed though stream: false"
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(r.body)
        frames = list(unpacker)
        kinds = [f.get("type") for f in frames]
        assert kinds and kinds[0] == "start", kinds
        assert kinds[-1] in ("end", "error") and kinds.count("end") + kinds.count("error") == 1, kinds
        assert set(kinds[1:-1]) <= {"delta"}, kinds
        if kinds[-1] == "error":
            assert frames[-1]["status"] < 500, frames[-1]
        else:
            ids = [t for f in frames[1:-1] for t in f["token_ids"]]
            assert frames[-1]["usage"]["completion_tokens"] == len(ids), frames
            assert frames[-1]["finish_reason"] in ("stop", "length"), frames[-1]
    else:
        assert ctype == "application/msgpack", ctype
        # A corrupted raw body may still decode to a request: only a sent value says what was asked.
        assert not (isinstance(value, dict) and value.get("stream") is not False), "whole though streaming was asked"
        whole = msgpack.unpackb(r.body, raw=False)
        assert isinstance(whole.get("text"), str) and whole.get("finish_reason") in ("stop", "length"), whole
        assert whole["usage"]["completion_tokens"] == len(whole["token_ids"]), whole


def check_openai(route: str, r: Response, body: Body) -> None:
    record(f"POST {route}", r)
    if r.status >= 400:
        error_of(r, expect="application/json")
        return
    assert r.status == 200, (r.status, r.body[:300])
    if body.hang_up:
        return
    ctype = r.headers.get("content-type", "")
    value = body.value if body.raw is None else None
    if ctype.startswith("text/event-stream"):
        assert not (isinstance(value, dict) and value.get("stream") is not True), "streamed though not asked to"
        assert r.body.endswith(b"data: [DONE]\n\n"), r.body[-300:]
        events = r.body.split(b"\n\n")[:-2]
        assert events, r.body[:300]
        chunks = []
        for event in events:
            assert event.startswith(b"data: "), event[:200]
            chunks.append(json.loads(event[6:]))
            assert "error" not in chunks[-1], chunks[-1]
        finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is not None]
        assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] in ("stop", "length"), chunks
    else:
        assert ctype.startswith("application/json"), ctype
        assert not (isinstance(value, dict) and value.get("stream") is True), "not streamed though stream: true"
        obj = json.loads(r.body)
        assert obj["choices"] and obj["choices"][0]["finish_reason"] in ("stop", "length"), obj
        assert obj["usage"]["completion_tokens"] >= 1, obj


def content_types(usual: str) -> st.SearchStrategy[str | None]:
    return st.sampled_from([usual] * 20 + [
        None, "", "application/json", "text/plain", "application/x-msgpack", "application/vnd.msgpack",
        "APPLICATION/MSGPACK; charset=binary", "application/msgpack;", "multipart/form-data; boundary=x",
        "application/msgpack\xff", "application/\xe9", " ; ",
    ])


@st.composite
def bodies(draw: st.DrawFn, kind: str) -> Body:
    """A body for the route of `kind` ("native", "chat", "completion"): mostly a mutated request
    in the route's codec, else any value, bytes, a hand-made edge case, a corrupted encoding, or a
    Content-Length over the limit."""
    native = kind == "native"
    ctype = draw(content_types("application/msgpack" if native else "application/json"))
    chunked = draw(st.sampled_from([False] * 4 + [True]))
    request = requests(kind, "msgpack" if native else "json")
    how = draw(st.sampled_from(["request"] * 6 + ["value", "raw", "special", "mutated", "too_large"]))
    if how == "request":
        hang_up = draw(st.sampled_from([False] * 7 + [True]))
        return Body(value=draw(request), content_type=ctype, chunked=chunked, hang_up=hang_up)
    if how == "value":
        return Body(value=draw(PACK_VALUES if native else JSON_VALUES), content_type=ctype, chunked=chunked)
    if how == "too_large":
        return Body(raw=b"{}", content_type=ctype, declared_length=MAX_BODY + 1)
    raw = {"raw": st.binary(max_size=64), "special": st.sampled_from(SPECIAL_MSGPACK if native else SPECIAL_JSON),
           "mutated": truncations(st.builds(msgpack.packb if native else dump_json, request))}[how]
    return Body(raw=draw(raw), content_type=ctype, chunked=chunked)


def assert_serving_and_idle(d: Daemon) -> None:
    assert d.proc.poll() is None, f"the daemon exited ({d.proc.returncode}); log:\n{d.log()[-5000:]}"
    r = d.request("POST", "/v1/generate", {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": False},
                  kind="msgpack", timeout=60)
    assert r.status == 200, (r.status, r.body[:300])
    assert 1 <= r.msgpack()["usage"]["completion_tokens"] <= 3
    # Aborted or finished requests release their blocks at the engine's next step.
    deadline = time.monotonic() + 10
    while True:
        s = d.request("GET", "/v1/status").json()
        if s["running"] == 0 and s["queue_depth"] == 0 and s["kv_blocks_used"] == 0:
            break
        assert time.monotonic() < deadline, {k: s.get(k) for k in ("running", "queue_depth", "kv_blocks_used")}
        time.sleep(0.05)


@pytest.mark.slow
@fuzz_settings(60)
@given(body=bodies("native"))
def test_fuzz_native_route(fuzz_daemon: Daemon, body: Body) -> None:
    check_native(send(fuzz_daemon, "POST", "/v1/generate", body, msgpack_route=True), body)


@pytest.mark.slow
@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_openai_routes(fuzz_daemon: Daemon, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["chat", "completion"]), label="kind")
    route = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    body = data.draw(bodies(kind), label="body")
    check_openai(route, send(fuzz_daemon, "POST", route, body), body)


TOKENIZE_VALUES = st.one_of(
    st.fixed_dictionaries({"text": JSON_TEXTS}, optional={"add_special_tokens": st.booleans() | JSON_VALUES}),
    st.fixed_dictionaries({"prompt": JSON_TEXTS | JSON_VALUES}),
    st.fixed_dictionaries({"text": JSON_VALUES}),
    JSON_VALUES,
)
DETOKENIZE_VALUES = st.one_of(
    st.fixed_dictionaries({"tokens": st.lists(st.integers(0, VOCAB - 1), max_size=20)}),
    st.fixed_dictionaries({"tokens": st.lists(JSON_INTS | FLOATS | st.booleans() | JSON_TEXTS, max_size=8)}),
    st.fixed_dictionaries({"tokens": JSON_VALUES}),
    JSON_VALUES,
)


@pytest.mark.slow
@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_tokenize_detokenize(fuzz_daemon: Daemon, data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(["/v1/tokenize", "/v1/detokenize"]), label="route")
    values = TOKENIZE_VALUES if route == "/v1/tokenize" else DETOKENIZE_VALUES
    body = data.draw(st.one_of(
        st.builds(Body, values, content_type=content_types("application/json"), chunked=st.booleans()),
        st.builds(Body, raw=st.binary(max_size=64) | st.sampled_from(SPECIAL_JSON)),
    ), label="body")
    r = send(fuzz_daemon, "POST", route, body)
    record(f"POST {route}", r)
    if r.status >= 400:
        error_of(r, expect="application/json")
        return
    assert r.status == 200, (r.status, r.body[:300])
    obj = json.loads(r.body)
    if route == "/v1/tokenize":
        assert isinstance(obj["tokens"], list) and obj["count"] == len(obj["tokens"]) and obj["max_model_len"] == 256
        assert all(is_int(t) and 0 <= t < VOCAB for t in obj["tokens"]), obj
    else:
        assert isinstance(obj["text"], str), obj


ROUTES = ["/v1/generate", "/v1/chat/completions", "/v1/completions", "/v1/tokenize", "/v1/detokenize", "/health",
          "/metrics", "/v1/status", "/v1/models", "/v1/reload"]
GET_ROUTES = ["/health", "/metrics", "/v1/status", "/v1/models"]
ODD_PATHS = ["/", "//", "/v1", "/v1/", "/v1/status/", "//v1/status", "/V1/STATUS", "/v1/status?x=1&y",
             "/v1/generate/", "/v1/%67enerate", "/v1/generate%00", "/v1/../health", "/%2e%2e/health", "/v2/generate",
             "/v1/chat", "/v1/models/default", "/health#x", "/metrics;x", "/" + "a" * 4000, "/%ff%fe", "/\u00e9",
             "/v1/generate?stream=true"]
# Printable ASCII without space, '#' and '?': a path http.client sends as it is.
PATH_CHARS = "".join(c for c in map(chr, range(33, 127)) if c not in "#?")
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


@st.composite
def misc_requests(draw: st.DrawFn) -> tuple[str, str, Body | None]:
    how = draw(st.sampled_from(["get"] * 3 + ["route", "odd", "random"]))
    if how == "get":
        return "GET", draw(st.sampled_from(GET_ROUTES)), None
    method = draw(st.sampled_from(METHODS))
    if how == "route":
        path = draw(st.sampled_from(ROUTES))
    elif how == "odd":
        path = draw(st.sampled_from(ODD_PATHS))
    else:
        path = "/" + draw(st.text(PATH_CHARS, max_size=30))
    if path.split("?")[0] in ("/v1/generate", "/v1/chat/completions", "/v1/completions") and method == "POST":
        method = "PUT"  # the POST routes have their own tests, with cheap bodies
    body = draw(st.none() | st.builds(Body, raw=st.binary(max_size=32)))
    return method, path.encode("ascii", "backslashreplace").decode(), body


@pytest.mark.slow
@fuzz_settings(60)
@given(case=misc_requests())
def test_fuzz_other_routes(fuzz_daemon: Daemon, case: tuple[str, str, Body | None]) -> None:
    method, path, body = case
    r = send(fuzz_daemon, method, path, body)
    record(f"{method} {path}" if path in ROUTES else f"{method} (other path)", r)
    bare = path.split("?")[0].split("#")[0]
    if r.status >= 400:
        if method != "HEAD":  # a HEAD answer has no body
            expect = {"/v1/generate": "application/msgpack"}.get(bare, "application/json" if bare in ROUTES else None)
            error_of(r, expect=expect)
        return
    if method == "GET" and bare == "/health":
        assert r.json() == {"status": "ok"}
    elif method == "GET" and bare == "/metrics":
        assert b"inflightd:num_requests_running" in r.body
    elif method == "GET" and bare == "/v1/status":
        assert r.json()["state"] == "ready"
    elif method == "GET" and bare == "/v1/models":
        assert r.json()["data"][0]["max_model_len"] == 256


@pytest.mark.slow
def test_daemon_serves_and_is_idle_after_fuzzing(fuzz_daemon: Daemon) -> None:
    """Runs after the fuzz tests above (pytest keeps the file's order); alone it still checks a
    fresh daemon."""
    assert_serving_and_idle(fuzz_daemon)


@pytest.mark.slow
def test_daemon_logged_no_traceback(fuzz_daemon: Daemon) -> None:
    """Nothing the fuzzing sent, a client hanging up mid-stream included, is an error worth a
    traceback in the daemon's log: one there is an exception no handler expected."""
    log = fuzz_daemon.log()
    first = log.find("Traceback")
    assert first < 0, f"the daemon logged {log.count('Traceback')} tracebacks; the first:\n{log[first: first + 4000]}"
