"""The model's CPU fast paths, each chosen by `CpuSettings` (why each exists: that module's doc):
products from NumPy's BLAS or the GGUF block codes, RMSNorm as one Numba call, column-major
float32 weights. `CpuPaths` binds the settings; the model calls its methods."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numba
import numpy as np
import torch
import torch.nn.functional as F

from numba_kernels import cpu_ops, cpu_qmatmul

from .cpu_settings import CpuSettings

if TYPE_CHECKING:
    from .llama import LlamaWeights, QuantWeight


class CpuPaths:
    """The ops as the settings choose them (any device: off the CPU they are torch's)."""

    def __init__(self, settings: CpuSettings | None = None) -> None:
        self.settings = settings or CpuSettings()

    def uses_codes(self, num_tokens: int) -> bool:
        return self.settings.uses_codes(num_tokens)

    def fused(self, x: torch.Tensor) -> bool:
        """Whether RMSNorm and RoPE of these rows run as one Numba call each."""
        return (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
                and x.shape[0] <= self.settings.fused_max_tokens and not x.requires_grad)

    def linear(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, wq: QuantWeight | None = None
    ) -> torch.Tensor:
        # x: [T, in]; w: [out, in]; bias: [out]; wq: w as block codes, if kept → [T, out] (F.linear).
        if wq is not None and self.uses_codes(x.shape[0]) and self.fused(x):
            out = qgemm(x, wq)
            return out if bias is None else out.add_(bias)
        if (self.settings.matmul == "numpy" and x.dtype == torch.float32 and x.device.type == "cpu"
                and not x.requires_grad):
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
        if self.settings.matmul != "numpy" or not self.settings.column_weights or weights.embed.device.type != "cpu":
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
