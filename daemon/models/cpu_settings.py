"""How the model runs on a CPU: which path serves each product and small op, as one frozen
settings object (`CpuSettings`) that the model and the runner are given. It is the daemon's
`runtime` config section, field for field; `inflightd.runtime.settings` builds it from the
file and the `INFLIGHTD_CPU_*` environment overrides, the only place those are read.

The paths, and why each exists (figures: benchmarks/RESULTS.md):
- float32 products through NumPy's BLAS (OpenBLAS in NumPy's wheels) rather than torch's (MKL,
  which takes a generic path on AMD CPUs): faster on this project's EPYC hosts from 1 to 512
  tokens, about even at 2048 (`matmul = "numpy"`; "torch" keeps torch's, for comparison);
- those weights stored column-major (`column_weights`): NumPy's BLAS runs x @ w.T faster at
  8-64 tokens when w.T is the contiguous array; the tied embedding's lookups become strided
  gathers, cheaper than the vocabulary projection they speed up;
- products of up to `qgemm_max_tokens` tokens from the GGUF block codes (`qgemv`,
  numba_kernels.cpu_qmatmul): ~1 byte per weight instead of 4, once for all the tokens; such
  steps are bound by memory, and OpenBLAS is at its least efficient on 2-8 rows;
- RMSNorm and RoPE of float32 batches up to `fused_max_tokens` tokens as one Numba call each
  (numba_kernels.cpu_ops) instead of torch's chains of small ops;
- attention over more than `serial_work` (`decode_serial_work` in one-call decode layers) context
  positions splits over the thread pool; below it, waking the pool costs more than it saves;
- OpenMP's wait policy and spin count (`omp_wait_policy`, `gomp_spincount`): process-wide, set
  before torch loads libgomp (`inflightd.runtime.settings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..checks import is_int


@dataclass(frozen=True)
class CpuSettings:
    matmul: Literal["numpy", "torch"] = "numpy"
    column_weights: bool = True
    qgemv: bool = True
    qgemm_max_tokens: int = 16
    fused_max_tokens: int = 64
    serial_work: int = 1024
    decode_serial_work: int = 64
    omp_wait_policy: Literal["passive", "active"] = "passive"
    gomp_spincount: int = 10000

    def __post_init__(self) -> None:
        if self.matmul not in ("numpy", "torch"):
            raise ValueError(f"matmul: must be numpy or torch (got {self.matmul!r})")
        if self.omp_wait_policy not in ("passive", "active"):
            raise ValueError(f"omp_wait_policy: must be passive or active (got {self.omp_wait_policy!r})")
        for name in ("column_weights", "qgemv"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false (got {getattr(self, name)!r})")
        for name in ("qgemm_max_tokens", "fused_max_tokens", "serial_work", "decode_serial_work", "gomp_spincount"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"{name}: must be a whole number ≥ 0 (got {value!r})")


    def uses_codes(self, num_tokens: int) -> bool:
        """Whether a float32 CPU step of this many tokens multiplies from the block codes (where
        the model has them): its products are then Numba parallel regions, not BLAS calls."""
        return self.qgemv and num_tokens <= self.qgemm_max_tokens
