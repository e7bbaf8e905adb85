"""Fused CPU versions of the model's small per-layer ops (RMSNorm, RoPE), for float32 batches of
a few tokens.

A decode step of one sequence spent longer in these than in attention: torch runs
``rms_norm`` as seven ops and ``apply_rope`` as slices, a cat and four arithmetic ops, each a
dispatch of a few µs on a 576-float row (``python benchmarks/step_profile.py --batch 1``:
RMSNorm 8 % and RoPE 6 % of the wall, attention 4 %; with these, 4 % and 0.4 %). One Numba call
does the same arithmetic in about a µs plus its argument passing. Serial on purpose: the rows
are tiny, and waking the thread pool would cost more than the work (see ``cpu.SERIAL_WORK``);
large batches stay on torch's multi-threaded ops.

Numerics: RoPE does exactly torch's operations in torch's order (``x1*cos - x2*sin``; no
contraction into FMAs), so it is bit-identical to ``inflightd.models.llama.apply_rope``.
RMSNorm sums the squares in another order than torch's reduction, so it matches to float32
rounding (~1e-7 relative), not bit for bit.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)  # no fastmath: the sum's order is written out below, not left to the compiler
def _rms_norm(x, w, eps, out):
    """out[t] = w * (x[t] / sqrt(mean(x[t]^2) + eps)); x, out [T, H] float32, w [H] float32.

    The squares go into eight partial sums in a fixed order. With fastmath the compiler chose
    the order itself, and chose differently for strided and contiguous rows on AVX-512 (the
    same row gave two results); spelled out, every layout and CPU adds in the same order, and
    the eight independent sums still vectorise."""
    h = x.shape[1]
    inv_h = np.float32(1.0) / np.float32(h)
    body = h - h % 8
    for t in range(x.shape[0]):
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
        for i in range(0, body, 8):
            s0 += x[t, i] * x[t, i]
            s1 += x[t, i + 1] * x[t, i + 1]
            s2 += x[t, i + 2] * x[t, i + 2]
            s3 += x[t, i + 3] * x[t, i + 3]
            s4 += x[t, i + 4] * x[t, i + 4]
            s5 += x[t, i + 5] * x[t, i + 5]
            s6 += x[t, i + 6] * x[t, i + 6]
            s7 += x[t, i + 7] * x[t, i + 7]
        s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
        for i in range(body, h):
            s += x[t, i] * x[t, i]
        r = np.float32(1.0) / np.sqrt(s * inv_h + eps)
        for i in range(h):
            out[t, i] = w[i] * (x[t, i] * r)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm of the rows of x [T, H] (float32, rows may be strided) with weight w [H]."""
    out = np.empty((x.shape[0], x.shape[1]), np.float32)
    _rms_norm(x, w, np.float32(eps), out)
    return out


@njit(cache=True)  # no fastmath: the same rounding as torch's separate multiply and add
def _rope(x, cos, sin, num_heads, head_dim):
    """In place on the first num_heads * head_dim columns of x [T, >= that] float32: rotate-half
    RoPE over the first rope_dim = cos.shape[1] dims of each head; cos, sin [T, rope_dim]."""
    rope_dim = cos.shape[1]
    half = rope_dim // 2
    for t in range(x.shape[0]):
        for hh in range(num_heads):
            base = hh * head_dim
            for i in range(half):
                x1 = x[t, base + i]
                x2 = x[t, base + half + i]
                x[t, base + i] = x1 * cos[t, i] - x2 * sin[t, i]
                x[t, base + half + i] = x2 * cos[t, half + i] + x1 * sin[t, half + i]


def rope_(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, num_heads: int, head_dim: int) -> None:
    """Rotate, in place, heads 0..num_heads-1 laid out along the rows of x [T, columns]: the
    q and k heads of a fused qkv projection are contiguous, so one call serves both."""
    _rope(x, cos, sin, num_heads, head_dim)


def warmup() -> None:
    """Compile (or load from the cache) both ops with the dispatcher's argument types."""
    x = np.ones((2, 8), np.float32)
    rms_norm(x, np.ones(8, np.float32), 1e-5)
    rms_norm(np.ones((2, 16), np.float32)[:, :8], np.ones(8, np.float32), 1e-5)  # strided rows
    rope_(np.ones((2, 16), np.float32), np.ones((2, 4), np.float32), np.zeros((2, 4), np.float32), 2, 8)
