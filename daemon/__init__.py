"""inflightd: a single-node LLM inference daemon with a pure-Python control plane.

`LLM` and `SamplingParams` are imported lazily: client commands (`inflightd chat`, `pull`)
must not pay for importing torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

# torch's bundled libgomp and the one Numba's omp layer loads share the cores: spinning workers
# of one stall the other. libgomp reads its settings once, when torch is first imported, so the
# defaults (a short spin, then sleep: runtime.settings, models.backend) are set here, before any
# module of the package imports torch; `inflightd serve` applies its config file's values the
# same way before it loads the model. A variable set by the user wins.
from .runtime.settings import apply_omp_environment, cpu_settings  # noqa: E402

apply_omp_environment(cpu_settings())

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
