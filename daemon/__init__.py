"""inflightd: a single-node LLM inference daemon with a pure-Python control plane.

`LLM` and `SamplingParams` are imported lazily: client commands (`inflightd chat`, `pull`)
must not pay for importing torch.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# torch's bundled libgomp and the one Numba's omp layer loads share the cores; spinning workers
# of one stall the other for whole scheduler slices (benchmarks/attention.py measured 3.9 ms vs
# 0.08 ms per alternation). libgomp reads this once, when torch is first imported, so it is set
# here, before any module of the package imports torch. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# ...but spin briefly first: waking sleeping workers costs ~60-110 µs on a VM, and a decode step
# of one sequence starts ~120 short parallel regions (see numba_kernels/__init__.py).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

if TYPE_CHECKING:
    from .engine.sampling_params import SamplingParams
    from .llm import LLM, RequestOutput

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "RequestOutput"):
        from . import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from .engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'inflightd' has no attribute {name!r}")
