"""inflightd: a single-node LLM inference daemon with a pure-Python control plane.

`LLM` and `SamplingParams` are imported lazily: client commands (`inflightd chat`, `pull`)
must not pay for importing torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .llm import LLM, RequestOutput
    from .sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "RequestOutput"):
        from . import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from .sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'inflightd' has no attribute {name!r}")
