"""Config schema and the socket helpers: no model, no daemon."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import fields
from pathlib import Path

import pytest

from inflightd.engine.sampling_params import SamplingParams
from inflightd.server.config import Config, ConfigError, load_config, parse_config, parse_memory
from inflightd.server.protocol import ProtocolError
from inflightd.server.requests import parse_chat, parse_completion, parse_native
from inflightd.server.sockets import AllowList, PeerCred, SocketInUseError, bind_unix

ETC = Path(__file__).resolve().parents[1] / "etc" / "inflightd.yaml"


def test_shipped_file_is_the_defaults_and_documents_every_key() -> None:
    assert load_config(ETC) == Config()
    text = ETC.read_text()
    for section in fields(Config):
        if section.name == "source":
            continue
        assert re.search(rf"^{section.name}:", text, re.M), section.name
        for f in fields(getattr(Config(), section.name)):
            # every key is set in the file, with a comment on it or just above it
            m = re.search(rf"^((?:  #.*\n)*)  {f.name}:(.*)$", text, re.M)
            assert m, f"{section.name}.{f.name} missing from {ETC}"
            assert m.group(1).strip() or "#" in m.group(2), f"{section.name}.{f.name} is not documented"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("scheduler: {max_queu_delay_ms: 3}", "scheduler.max_queu_delay_ms: unknown key"),
        ("schedular: {}", "unknown section 'schedular'"),
        ("scheduler: {max_num_seqs: two}", "scheduler.max_num_seqs: must be an integer"),
        ("scheduler: {max_num_seqs: 0}", "scheduler.max_num_seqs: must be an integer ≥ 1"),
        ("scheduler: {policy: lifo}", "scheduler.policy: must be one of fcfs, priority"),
        ("scheduler: {chunked_prefill: yes please}", "scheduler.chunked_prefill: must be true or false"),
        ("kv_cache: {memory: lots}", "kv_cache.memory"),
        ("kv_cache: {block_size: 12}", "kv_cache.block_size"),
        ("listen: {tcp: '0.0.0.0:80'}", "loopback"),
        ("listen: {socket_mode: '0999'}", "listen.socket_mode"),
        ("limits: [1, 2]", "limits: must be a mapping"),
        ("scheduler: {max_num_seqs: [oops\n", "invalid YAML (line"),
        ("scheduler: {chunked_prefill: false, max_num_batched_tokens: 512}", "without chunked prefill"),
    ],
)
def test_errors_name_the_key(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        parse_config(text, source="x.yaml")


def test_diff_live_and_restart_keys() -> None:
    old = Config()
    new = parse_config("scheduler: {max_num_seqs: 8}\nkv_cache: {block_size: 32}\nlog: {level: debug}\n")
    live, restart = old.diff(new)
    assert live == ["scheduler.max_num_seqs", "log.level"] and restart == ["kv_cache.block_size"]
    merged = old.with_live_from(new)
    assert merged.scheduler.max_num_seqs == 8 and merged.kv_cache.block_size == 16


def test_parse_memory() -> None:
    assert parse_memory("2GiB") == 2 * 2**30 and parse_memory("512MB") == 512 * 10**6
    assert parse_memory("1024") == 1024 and parse_memory("40%") == pytest.approx(0.4)
    for bad in ("0", "-1GiB", "150%", "2 parsecs"):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_native_parser_refuses_unknown_and_wrong_types() -> None:
    with pytest.raises(ProtocolError, match="'tempurature': unknown key"):
        parse_native({"prompt": "x", "tempurature": 0})
    with pytest.raises(ProtocolError, match="max_tokens: must be an integer"):
        parse_native({"prompt": "x", "max_tokens": 1.5})
    with pytest.raises(ProtocolError, match="stream: must be true or false"):
        parse_native({"prompt": "x", "stream": 1})
    r = parse_native({"messages": [{"role": "user", "content": "hi"}], "stop": ["\n"], "top_k": 5})
    assert r.stream and r.params == SamplingParams(max_tokens=1, stop=("\n",), top_k=5)


def test_openai_parsers() -> None:
    r = parse_chat({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                            {"type": "text", "text": "b"}]}],
                    "max_completion_tokens": 7, "stop": "x", "logprobs": True, "top_logprobs": 2,
                    "user": "u", "some_future_field": 1})
    assert r.messages == [{"role": "user", "content": "ab"}] and r.max_tokens == 7 and not r.stream
    assert r.params.stop == ("x",) and r.params.logprobs == 2 and r.params.max_tokens == 7
    with pytest.raises(ProtocolError, match="image_url"):
        parse_chat({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    with pytest.raises(ProtocolError, match="response_format"):
        parse_chat({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}})
    with pytest.raises(ProtocolError, match="stream_options"):
        parse_chat({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}})
    with pytest.raises(ProtocolError, match="echo"):
        parse_completion({"prompt": "x", "echo": True})
    with pytest.raises(ProtocolError, match="batches"):
        parse_completion({"prompt": ["a", "b"]})
    assert parse_completion({"prompt": ["only"]}).prompt == "only"
    assert parse_completion({"prompt": [1, 2, 3], "top_k": -1}).params == SamplingParams(max_tokens=1, top_k=0)


def test_bind_unix_mode_live_and_stale(tmp_path: Path) -> None:
    path = str(tmp_path / "s" / "d.sock")
    sock = bind_unix(path, 0o660)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    with pytest.raises(SocketInUseError, match="another daemon"):
        bind_unix(path, 0o660)  # a live listener answers: never steal it
    sock.close()  # now nobody listens: a stale file, replaced
    sock2 = bind_unix(path, 0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    sock2.close()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    if os.geteuid() == 0:  # only root can hand a folder to another uid
        os.chown(foreign, 65534, 65534)
        with pytest.raises(SocketInUseError, match="belongs to uid 65534"):
            bind_unix(str(foreign / "d.sock"), 0o660)
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(SocketInUseError, match="not a socket"):
        bind_unix(str(plain), 0o660)


def test_allow_list() -> None:
    allow = AllowList.build(None, (1234,), ())
    assert allow.allows(PeerCred(os.getpid(), os.getuid(), 99999))
    assert allow.allows(PeerCred(1, 1234, 99999)) and allow.allows(PeerCred(1, 0, 0))
    # a pid that does not exist has no supplementary groups to match
    assert not allow.allows(PeerCred(2**22 + 7, 4242, 4242))
    assert AllowList(set(), {4242}).allows(PeerCred(2**22 + 7, 4242, 4242))
