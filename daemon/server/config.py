"""The daemon's YAML configuration: frozen dataclasses for each section, loading with messages
that name the offending key, and which keys a reload may change live.

A leaf module (no torch, no aiohttp). Every key of `etc/inflightd.yaml` is a field here, with
the same default; unknown keys are errors, not silently ignored, so that a typo in a reload is
reported instead of quietly keeping the old value.

Live keys (applied at the next engine step on SIGHUP / `inflightd reload`): every key of the
sections in `LIVE_SECTIONS` but those in `RESTART_KEYS`. The others (model, listen, kv_cache, runtime)
shape what was built at start: a reload that changes them reports them as needing a restart and
keeps the running values.

A config is checked whole before anyone sees it (`parse_config`: types, ranges and the rules
between keys), so that a reload is all or nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args, get_origin, get_type_hints

import yaml

from ..checks import is_finite_number
from ..engine.scheduler_config import SchedulerConfig
from ..models.cpu_settings import CpuSettings

LIVE_SECTIONS = ("scheduler", "limits", "slo", "cost", "log")
# Keys of live sections that only a restart changes: aiohttp fixes them per listener at start.
RESTART_KEYS = frozenset({"limits.keepalive_timeout_s"})
MAX_CONFIG_BYTES = 1 << 20  # a config file is a page of YAML; refuse a runaway file outright
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(ValueError):
    """The config file cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ModelSection:
    path: str = "default"  # "default", a catalogue name, a .gguf file or a Hugging Face folder
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class ListenSection:
    unix_socket: str | None = None  # None: $XDG_RUNTIME_DIR/inflightd/inflightd.sock or /run/inflightd/…
    socket_mode: str = "0660"
    tcp: str | None = None  # "127.0.0.1:8000": also serve TCP on loopback (no peer credentials there)
    allow_uids: tuple[int, ...] = ()  # besides the daemon's own uid and root
    allow_groups: tuple[str | int, ...] = ()  # names or gids, besides the socket file's group


@dataclass(frozen=True)
class KVCacheSection:
    block_size: int = 16
    memory: str | int = "auto"  # "auto", bytes, or "2GiB" / "512MB" / "40%"
    prefix_caching: bool = True


@dataclass(frozen=True)
class LimitsSection:
    max_model_len: int = 8192
    default_max_tokens: int = 512
    max_body_bytes: int = 1048576
    request_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0  # on SIGTERM: how long running requests may finish
    queue_timeout_s: float = 0.0  # a request not admitted after this long gets 503; 0 = no limit
    read_timeout_s: float = 30.0  # the whole request body must arrive within this (else 408)
    write_timeout_s: float = 30.0  # a client that takes no output for this long is dropped
    keepalive_timeout_s: float = 5.0  # idle connection (or unfinished request head) → closed
    max_connections: int = 1024  # open connections, all listeners together; beyond: 503, closed


@dataclass(frozen=True)
class SloSection:
    ttft_ms: float = 2000.0
    tpot_ms: float = 200.0


@dataclass(frozen=True)
class CostSection:
    usd_per_hour: float = 0.0  # what the machine costs; 0 = do not report cost per token
    watts: float = 0.0  # its power draw under load, for tokens per joule; 0 = unknown


@dataclass(frozen=True)
class LogSection:
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"


@dataclass(frozen=True)
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    listen: ListenSection = field(default_factory=ListenSection)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_cache: KVCacheSection = field(default_factory=KVCacheSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    slo: SloSection = field(default_factory=SloSection)
    cost: CostSection = field(default_factory=CostSection)
    log: LogSection = field(default_factory=LogSection)
    runtime: CpuSettings = field(default_factory=CpuSettings)
    source: str | None = field(default=None, compare=False)  # the file it came from

    def diff(self, other: Config) -> tuple[list[str], list[str]]:
        """Keys whose values differ from `other`'s, as (live, restart_only) dotted names."""
        live: list[str] = []
        restart: list[str] = []
        for section in fields(self):
            if section.name == "source":
                continue
            mine, theirs = getattr(self, section.name), getattr(other, section.name)
            for f in fields(mine):
                if getattr(mine, f.name) != getattr(theirs, f.name):
                    key = f"{section.name}.{f.name}"
                    (live if _is_live(key) else restart).append(key)
        return live, restart

    def with_live_from(self, other: Config) -> Config:
        """This config with `other`'s live keys: what a reload puts in force."""
        sections = {}
        for name in LIVE_SECTIONS:
            mine = getattr(self, name)
            kept = {k: getattr(mine, k) for k in (f.name for f in fields(mine)) if not _is_live(f"{name}.{k}")}
            sections[name] = replace(getattr(other, name), **kept)
        return replace(self, source=other.source, **sections)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for section in fields(self):
            if section.name == "source":
                continue
            value = getattr(self, section.name)
            out[section.name] = {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
        return out


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_live(key: str) -> bool:
    return key.split(".", 1)[0] in LIVE_SECTIONS and key not in RESTART_KEYS


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """The defaults when `path` is None; else the file, every key checked."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_CONFIG_BYTES} bytes: not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    return parse_config(text, source=str(p))


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse and check a whole config: every key, range and cross-key rule. Raises ConfigError
    (never anything else) naming the file and the key."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{source}: invalid YAML{at}: {problem}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    except ValueError as e:  # e.g. an integer beyond Python's int-string conversion limit
        raise ConfigError(f"{source}: invalid YAML: {str(e).split(';')[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    sections: dict[str, Any] = {}
    hints = get_type_hints(Config)
    known = [f.name for f in fields(Config) if f.name != "source"]
    for name, value in data.items():
        if name not in known:
            raise ConfigError(f"{source}: unknown section {name!r} (known: {', '.join(known)})")
        if value is None:
            continue
        sections[name] = _section(hints[name], value, f"{source}: {name}")
    config = Config(source=source, **sections)
    _check(config, source)
    return config


_S = TypeVar("_S")


def _section(cls: type[_S], data: object, where: str) -> _S:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: must be a mapping, got {type(data).__name__}")
    assert is_dataclass(cls)
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(names)})")
        values[key] = _coerce(hints[key], value, f"{where}.{key}")
    try:
        return cast(_S, cls(**values))
    except (TypeError, ValueError) as e:
        # the section's own checks say "key: why (got value)": name the key in full
        key, sep, why = str(e).partition(": ")
        if sep and key in names:
            raise ConfigError(f"{where}.{key}: {why}") from None
        raise ConfigError(f"{where}: {e}") from None


def _coerce(tp: Any, value: object, where: str) -> object:
    """Check `value` against the annotation `tp`; ints are accepted where floats are asked."""
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, args))}; got {_shown(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be a list, got {_shown(value)}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if args and type(None) in args:  # Optional / unions
        if value is None:
            return None
    if args:  # a union: the first member that accepts it
        for member in args:
            if member is type(None):
                continue
            try:
                return _coerce(member, value, where)
            except ConfigError:
                pass
        names = " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"{where}: must be {names}; got {_shown(value)}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false; got {_shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer; got {_shown(value)}")
        if not -(1 << 63) <= value < 1 << 63:
            raise ConfigError(f"{where}: out of range; got {_shown(value)}")
        return value
    if tp is float:
        if not is_finite_number(value):
            raise ConfigError(f"{where}: must be a number; got {_shown(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string; got {_shown(value)}")
        return value
    raise AssertionError(f"unhandled annotation {tp!r} at {where}")


def _check(c: Config, source: str) -> None:
    """Ranges, with the key named."""

    def need(ok: bool, key: str, why: str, value: object) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key}: {why}; got {_shown(value)}")

    s = c.scheduler  # its own ranges and rules are checked by SchedulerConfig
    k = c.kv_cache
    need(k.block_size in (8, 16, 32, 64, 128), "kv_cache.block_size", "must be 8, 16, 32, 64 or 128", k.block_size)
    if isinstance(k.memory, str) and k.memory != "auto":
        try:
            parse_memory(k.memory)
        except ValueError as e:
            raise ConfigError(f"{source}: kv_cache.memory: {e}") from None
    if isinstance(k.memory, int):
        need(k.memory > 0, "kv_cache.memory", "must be positive", k.memory)
    lim = c.limits
    for key in ("max_model_len", "default_max_tokens", "max_body_bytes"):
        need(getattr(lim, key) >= 1, f"limits.{key}", "must be ≥ 1", getattr(lim, key))
    for key in ("request_timeout_s", "read_timeout_s", "write_timeout_s", "keepalive_timeout_s"):
        need(getattr(lim, key) > 0, f"limits.{key}", "must be > 0", getattr(lim, key))
    for key in ("drain_timeout_s", "queue_timeout_s"):
        need(getattr(lim, key) >= 0, f"limits.{key}", "must be ≥ 0", getattr(lim, key))
    need(lim.max_connections >= 1, "limits.max_connections", "must be ≥ 1", lim.max_connections)
    if not s.chunked_prefill:
        need(
            s.max_num_batched_tokens >= lim.max_model_len,
            "scheduler.max_num_batched_tokens",
            f"must be ≥ limits.max_model_len ({lim.max_model_len}) without chunked prefill",
            s.max_num_batched_tokens,
        )
    need(c.slo.ttft_ms > 0, "slo.ttft_ms", "must be > 0", c.slo.ttft_ms)
    need(c.slo.tpot_ms > 0, "slo.tpot_ms", "must be > 0", c.slo.tpot_ms)
    need(c.cost.usd_per_hour >= 0, "cost.usd_per_hour", "must be ≥ 0", c.cost.usd_per_hour)
    need(c.cost.watts >= 0, "cost.watts", "must be ≥ 0", c.cost.watts)
    try:
        mode = int(c.listen.socket_mode, 8)
    except ValueError:
        mode = -1
    need(0 <= mode <= 0o777, "listen.socket_mode", "must be an octal mode such as \"0660\"", c.listen.socket_mode)
    if c.listen.tcp is not None:
        try:
            parse_tcp(c.listen.tcp)
        except ValueError as e:
            raise ConfigError(f"{source}: listen.tcp: {e}") from None


def parse_memory(text: str) -> int | float:
    """'2GiB' / '512MB' / '1073741824' → bytes (int); '40%' → a fraction of the device (float)."""
    t = text.strip()
    if t.endswith("%"):
        share = float(t[:-1]) / 100
        if not 0 < share <= 1:
            raise ValueError(f"a percentage must be in (0, 100], got {text!r}")
        return share
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    num = t.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ").strip()
    unit = t[len(num) :].strip().lower()
    if unit not in units or not num:
        raise ValueError(f"expected bytes such as 2GiB, 512MB or 40%, got {text!r}")
    value = float(num) * units[unit]
    if value <= 0:
        raise ValueError(f"must be positive, got {text!r}")
    return int(value)


def parse_tcp(text: str) -> tuple[str, int]:
    """'127.0.0.1:8000' → (host, port); only loopback hosts: the TCP listener has no peer
    credentials, so it must not be reachable from other machines."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"only loopback (127.0.0.1, ::1, localhost) is allowed, got {host!r}")
    return host, int(port)


SYSTEM_SOCKET = "/run/inflightd/inflightd.sock"  # the system service's (systemd/inflightd.socket)


def default_socket_path(system: bool | None = None) -> str:
    """$XDG_RUNTIME_DIR/inflightd/inflightd.sock for a user, /run/inflightd/inflightd.sock for
    root (or with `system`)."""
    if system is None:
        system = os.geteuid() == 0 and not os.environ.get("XDG_RUNTIME_DIR")
    if system:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/inflightd-{os.getuid()}"
    return os.path.join(runtime, "inflightd", "inflightd.sock")

