"""The CPU backend's settings (`inflightd.models.cpu_settings.CpuSettings`) from the config file's
`runtime` section and the environment, and the OpenMP environment they imply. The one module
that reads the `INFLIGHTD_CPU_*` variables and sets `OMP_WAIT_POLICY` / `GOMP_SPINCOUNT`.

Precedence, per setting: an environment variable set by whoever started the process, then the
config file, then the default. The OpenMP variables are read by libgomp once, when torch is
first imported: `inflightd/__init__.py` applies the defaults at import, before any module of
the package imports torch, and `inflightd serve` applies the file's values before it loads the
model. Torch-free, so that both can call it first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

from ..models.cpu_settings import CpuSettings

# variable → (CpuSettings field, parser)
_ENV = {
    "INFLIGHTD_CPU_MATMUL": "matmul",
    "INFLIGHTD_CPU_COLUMN_WEIGHTS": "column_weights",
    "INFLIGHTD_CPU_QGEMV": "qgemv",
    "INFLIGHTD_CPU_QGEMM_MAX_TOKENS": "qgemm_max_tokens",
    "INFLIGHTD_CPU_FUSED_MAX_TOKENS": "fused_max_tokens",
    "INFLIGHTD_CPU_SERIAL_WORK": "serial_work",
    "INFLIGHTD_CPU_DECODE_SERIAL_WORK": "decode_serial_work",
    "OMP_WAIT_POLICY": "omp_wait_policy",
    "GOMP_SPINCOUNT": "gomp_spincount",
}
# What the environment held before this module set anything: those values are the user's.
_USER_ENV = {name: os.environ[name] for name in _ENV if name in os.environ}


def _parse(field: str, text: str, name: str) -> Any:
    kind = {f.name: f.type for f in fields(CpuSettings)}[field]
    value = text.strip()
    if kind == "bool":
        if value not in ("0", "1"):
            raise ValueError(f"{name} must be 0 or 1, got {text!r}")
        return value == "1"
    if kind == "int":
        if not value.isdigit():
            raise ValueError(f"{name} must be a whole number, got {text!r}")
        return int(value)
    return value.lower()


def cpu_settings(base: CpuSettings | None = None, environ: Mapping[str, str] | None = None) -> CpuSettings:
    """`base` (the config file's `runtime` section, or the defaults) with the user's environment
    overrides applied. Raises ValueError naming the variable for a value it cannot use."""
    base = base or CpuSettings()
    env = _USER_ENV if environ is None else environ
    changes = {field: _parse(field, env[name], name) for name, field in _ENV.items() if name in env}
    try:
        return replace(base, **changes)
    except ValueError as e:
        raise ValueError(f"environment: {e}") from None


def apply_omp_environment(settings: CpuSettings) -> None:
    """Set OpenMP's wait policy and spin count for this process, unless the user set them.
    Effective only before torch is imported (libgomp reads them once)."""
    for name, value in (("OMP_WAIT_POLICY", settings.omp_wait_policy.upper()),
                        ("GOMP_SPINCOUNT", str(settings.gomp_spincount))):
        if name not in _USER_ENV:
            os.environ[name] = value
