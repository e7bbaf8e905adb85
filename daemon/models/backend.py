"""How the model runs on a CPU: which path serves each product and small op, as one frozen
settings object (`CpuBackend`) that the model and the runner are given. It is the daemon's
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
from typing import TYPE_CHECKING, Literal

import numba
import numpy as np
import torch
import torch.nn.functional as F

from numba_kernels import cpu_ops, cpu_qmatmul

from ..checks import is_int

if TYPE_CHECKING:
    from .llama import LlamaWeights, QuantWeight


@dataclass(frozen=True)
class CpuBackend:
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

    # ---------------------------------------------------------------------------- choices
    def uses_codes(self, num_tokens: int) -> bool:
        """Whether a float32 CPU step of this many tokens multiplies from the block codes (where
        the model has them): its products are then Numba parallel regions, not BLAS calls."""
        return self.qgemv and num_tokens <= self.qgemm_max_tokens

    def fused(self, x: torch.Tensor) -> bool:
        """Whether RMSNorm and RoPE of these rows run as one Numba call each."""
        return (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
                and x.shape[0] <= self.fused_max_tokens and not x.requires_grad)

    # ---------------------------------------------------------------------------- the ops
    def linear(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, wq: QuantWeight | None = None
    ) -> torch.Tensor:
        # x: [T, in]; w: [out, in]; bias: [out]; wq: w as block codes, if kept → [T, out] (F.linear).
        if wq is not None and self.uses_codes(x.shape[0]) and self.fused(x):
            out = qgemm(x, wq)
            return out if bias is None else out.add_(bias)
        if self.matmul == "numpy" and x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad:
            out = torch.from_numpy(np.matmul(x.numpy(), w.numpy().T))
            return out if bias is None else out.add_(bias)
        return F.linear(x, w, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # x: [T, hidden]. Statistics in float32 whatever the model dtype, as the reference does.
        if self.fused(x) and weight.dtype == torch.float32:
            return torch.from_numpy(cpu_ops.rms_norm(x.numpy(), weight.numpy(), eps))
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    def column_major_weights(self, weights: LlamaWeights) -> None:
        """Store each linear of a CPU float32 model column-major for NumPy's BLAS (see the
        module doc), the tied embedding too; the tensors keep their [out, in] shapes."""
        if self.matmul != "numpy" or not self.column_weights or weights.embed.device.type != "cpu":
            return
        if weights.embed.dtype != torch.float32:
            return
        for lw in weights.layers:
            lw.qkv, lw.o = _column_major(lw.qkv), _column_major(lw.o)
            lw.gate_up, lw.down = _column_major(lw.gate_up), _column_major(lw.down)
        tied = weights.lm_head is weights.embed
        weights.lm_head = _column_major(weights.lm_head)
        if tied:
            weights.embed = weights.lm_head


def _column_major(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous().t()


_POOL: list[int] = []


def num_threads() -> int:
    """Numba's pool size (fixed once the pool exists), remembered: the call costs ~2 µs."""
    if not _POOL:
        _POOL.append(numba.get_num_threads())
    return _POOL[0]


def qgemm(x: torch.Tensor, wq: QuantWeight) -> torch.Tensor:
    """x [T, in] float32 @ the block-coded weight's transpose → [T, out]."""
    xv = np.ascontiguousarray(x.numpy())
    return torch.from_numpy(cpu_qmatmul.qgemm(xv, wq.q, wq.d, wq.m, wq.bits, num_threads()))
