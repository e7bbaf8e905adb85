"""Matrix products against block-quantized weights (GGUF's 32-element block types), for the few
tokens of a decode step on the CPU.

A decode step of one sequence reads every weight once for one token, so its linears are bound by
memory bandwidth: the float32 weights of the default model are 540 MB per token, ~17 ms at this
machine's ~30 GB/s. Kept as 1-byte integer codes with a float32 scale (and offset) per block of
32, the same weights are 4x fewer bytes, and the product is computed from them directly:

    w[r, 32j + i] = d[r, j] * q[r, 32j + i] + m[r, j]
    y[t, r] = sum_j d[r, j] * sum_i q[r, 32j + i] * x[t, 32j + i]  +  sum_j m[r, j] * xs[t, j]

with xs[t, j] the sum of x[t] over block j. These are exactly the weights the float32 path
dequantizes (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 all have this form), so the results agree to float32
rounding. One token only: with more, the loop below stops vectorising well, and from two
tokens on float32 BLAS (which reads the weights once for all of them) is as fast.

Layout of the loop: two rows at a time (they share the loads of x), 32 float32 lanes of partial
sums per row (four AVX2 registers' worth, reduced once per row, not once per block),
the scale applied per block. Parallel over chunks of rows; the pool must be awake for this to
pay (see ``numba_kernels.__init__``: a bounded spin instead of sleeping at once).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .cpu_math import FASTMATH

BLOCK = 32


@intrinsic
def _i8f(typingctx, b):
    """int8 -> float32 without Numba's promotion to int64 (which AVX2 cannot convert in
    vectors): a signed convert straight from the 8-bit value."""
    if not isinstance(b, types.Integer) or b.bitwidth != 8:
        return None

    def codegen(context, builder, signature, args):
        return builder.sitofp(args[0], ir.FloatType())

    return types.float32(b), codegen


@njit(cache=True, fastmath=FASTMATH)
def _rows(x, xs, q, d, m, out, r0, r1):
    """Rows [r0, r1) (r1 - r0 even) of out [N] = dequant(q, d, m) @ x [K]."""
    nb = d.shape[1]
    acc = np.empty((2, BLOCK), np.float32)
    for r in range(r0, r1, 2):
        acc[:] = 0.0
        ms0 = np.float32(0.0)
        ms1 = np.float32(0.0)
        for j in range(nb):
            d0 = d[r, j]
            d1 = d[r + 1, j]
            b = j * BLOCK
            for i in range(BLOCK):
                xv = x[b + i]
                acc[0, i] += d0 * (_i8f(q[r, b + i]) * xv)
                acc[1, i] += d1 * (_i8f(q[r + 1, b + i]) * xv)
            ms0 += m[r, j] * xs[j]
            ms1 += m[r + 1, j] * xs[j]
        s0 = ms0
        s1 = ms1
        for i in range(BLOCK):
            s0 += acc[0, i]
            s1 += acc[1, i]
        out[r] = s0
        out[r + 1] = s1


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def _qgemv(x, q, d, m, out, nchunks):
    nb = d.shape[1]
    xs = np.empty(nb, np.float32)
    for j in range(nb):
        s = np.float32(0.0)
        for i in range(BLOCK):
            s += x[j * BLOCK + i]
        xs[j] = s
    pairs = q.shape[0] // 2
    for c in prange(nchunks):
        _rows(x, xs, q, d, m, out, 2 * (c * pairs // nchunks), 2 * ((c + 1) * pairs // nchunks))


def qgemv(x: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray, nchunks: int) -> np.ndarray:
    """dequant(q, d, m) @ x for one token: x [K] float32 (contiguous); W [N, K] = d * q + m per
    block of 32 along K: q [N, K] int8, d and m [N, K / 32] float32 (m all zeros for the
    symmetric types); N even. Returns a new [N] float32 array."""
    out = np.empty(q.shape[0], np.float32)
    _qgemv(x, q, d, m, out, nchunks)
    return out


def warmup() -> None:
    """Compile (or load from the cache) with the exact argument types the model passes."""
    qgemv(np.ones(BLOCK, np.float32), np.ones((2, BLOCK), np.int8), np.ones((2, 1), np.float32),
          np.zeros((2, 1), np.float32), 1)
