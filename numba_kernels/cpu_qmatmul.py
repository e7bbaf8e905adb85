"""Products of a few tokens against block-quantized weights (GGUF's 32-element block types), for
decode steps of up to a few sequences on the CPU.

Such a step reads every weight once for a few tokens, so its linears are bound by memory: the
float32 weights of the default model are 540 MB per step, ~21 ms at this machine's ~26 GB/s
(and OpenBLAS is at its least efficient on 2-8 rows: ``python benchmarks/qgemv.py --tokens``).
Kept as the checkpoint's own codes with a float32 scale (and offset) per block of 32, the same
weights are 101 MB (Q4 codes, 4 bits each; the Q8_0 vocab projection 1 byte each), and the
product is computed from them directly:

    w[r, 32j + i] = d[r, j] * q[r, 32j + i] + m[r, j]
    y[r] = sum_j d[r, j] * sum_i q[r, 32j + i] * x[32j + i]  +  sum_j m[r, j] * sum_i x[32j + i]

These are exactly the weights the float32 path dequantizes (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 all have
this form), so the results agree to float32 rounding.

Code layouts (``bits``):
- 8: one signed byte per weight, q int8 [N, K];
- 4: two codes 0..15 per byte, q uint8 [N, K / 2]; block j of a row is bytes 16j..16j+15, byte k
  (k < 8) holding element k in its low nibble and element k + 8 in its high one, byte 8 + k
  elements 16 + k and 24 + k. (ggml pairs element k with k + 16; this order lets eight bytes
  widen to eight 32-bit lanes with one load, whose two nibbles are then eight codes each.)

The inner loop is LLVM vector IR (an ``@intrinsic``): Numba's own loop kept its per-lane partial
sums in a heap array the optimizer could not prove free of aliasing, so they went through memory
on every block, which made the old kernel compute-bound well below memory speed. Here a pair of
rows' codes become floats in AVX2 registers (8 lanes) once per block for up to GROUP tokens,
a block's four products are summed before its scale is applied, the partial sums stay in
registers (allocas that mem2reg turns into SSA values) and each row prefetches ahead (the
hardware prefetcher alone did not keep a core busy on matrices larger than the cache). Parallel
over chunks of rows; the pool must be awake for this to pay (see ``numba_kernels.__init__``).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .cpu_vec import F32, I8, I32, V8F, c64, fma, hsum, splat

BLOCK = 32
# Bytes ahead of the current block that each row prefetches (1-4 KiB did alike in development
# timings; without prefetching, matrices larger than the cache were markedly slower).
PREFETCH_BYTES = 1152

# Tokens per pass over a pair of rows: each block's codes are widened to floats once and
# multiplied with up to this many tokens' x (more would spill the 16 AVX2 registers).
GROUP = 4


def _make_dot(tokens: int):  # noqa: ANN202 (a Numba intrinsic)
    """An intrinsic: the dot products of two adjacent rows of codes with ``tokens`` rows of x,
    over nb blocks. Arguments: the code width (4 or 8 bits); the address of x's first row and
    the bytes between its rows; the same for s, the per-lane block sums of x (see `_lane_sums`;
    unused without offsets); the address of row r's codes and the bytes between rows of codes;
    the addresses of row r's d and m (0: no offsets); the blocks per row; the address of
    out[0, r] and the bytes between rows of out. Writes out[t, r] and out[t, r + 1] for
    t < tokens.

    Each (row, token) sum sees the same operations in the same order whatever ``tokens`` is, so
    a token's result does not depend on which others share its pass (batch invariance). The
    code width and the offsets are tested once, outside the loop over blocks."""

    @intrinsic
    def dot(typingctx, bits, xa, x_stride, sa, s_stride, qa, q_stride, da, ma, nb, oa, o_stride):  # noqa: ANN001, ANN202, ARG001
        sig = types.void(*[types.intp] * 12)

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
            bits, xa, x_stride, sa, s_stride, qa, q_stride, da, ma, nb, oa, o_stride = args
            mod = builder.module
            fma_v = fma(builder)
            prefetch = cgutils.get_or_insert_function(
                mod, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]), "llvm.prefetch.p0i8")

            def rows_of(base: ir.Value, stride: ir.Value, n: int, ty: ir.Type) -> list[ir.Value]:
                p = builder.inttoptr(base, I8.as_pointer())
                return [builder.bitcast(builder.gep(p, [builder.mul(c64(i), stride)]), ty.as_pointer())
                        for i in range(n)]

            xrows = rows_of(xa, x_stride, tokens, V8F)
            srows = rows_of(sa, s_stride, tokens, V8F)
            q0 = builder.inttoptr(qa, I8.as_pointer())
            qrows = [q0, builder.gep(q0, [q_stride])]
            d0 = builder.inttoptr(da, F32.as_pointer())
            drows = [d0, builder.gep(d0, [nb])]
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(V8F, None)) for _ in range(tokens)]
                   for _ in range(2)]

            def codes(qrow: ir.Value, j: ir.Value, width: int) -> list[ir.Value]:
                base = builder.gep(qrow, [builder.mul(j, c64(BLOCK * width // 8))])
                v8 = builder.bitcast(base, ir.VectorType(I8, 8).as_pointer())
                if width == 8:
                    return [builder.sitofp(builder.load(builder.gep(v8, [c64(k)]), align=1), V8F) for k in range(4)]
                out = []
                for k in range(2):
                    w = builder.zext(builder.load(builder.gep(v8, [c64(k)]), align=1), ir.VectorType(I32, 8))
                    lo = builder.and_(w, ir.Constant(w.type, [0x0F] * 8))
                    hi = builder.lshr(w, ir.Constant(w.type, [4] * 8))
                    out += [builder.sitofp(lo, V8F), builder.sitofp(hi, V8F)]
                return out

            def loop(width: int, with_m: bool) -> None:
                mrows = None
                if with_m:
                    m0 = builder.inttoptr(ma, F32.as_pointer())
                    mrows = [m0, builder.gep(m0, [nb])]
                with cgutils.for_range(builder, nb) as it:
                    j = it.index
                    ahead = builder.add(builder.mul(j, c64(BLOCK * width // 8)), c64(PREFETCH_BYTES))
                    for qrow in qrows:  # read, keep in all cache levels, data
                        flags = [ir.Constant(I32, v) for v in (0, 3, 1)]
                        builder.call(prefetch, [builder.gep(qrow, [ahead]), *flags])
                    for r in range(2):
                        qf = codes(qrows[r], j, width)
                        dv = splat(builder, builder.load(builder.gep(drows[r], [j])))
                        mv = None if mrows is None else splat(builder, builder.load(builder.gep(mrows[r], [j])))
                        for t in range(tokens):
                            xv = [builder.load(builder.gep(xrows[t], [builder.add(builder.mul(j, c64(4)), c64(k))]),
                                               align=4) for k in range(4)]
                            t01 = builder.call(fma_v, [qf[1], xv[1], builder.fmul(qf[0], xv[0])])
                            t23 = builder.call(fma_v, [qf[3], xv[3], builder.fmul(qf[2], xv[2])])
                            a = builder.load(acc[r][t])
                            if mv is not None:  # the block's offset times x's per-lane block sum
                                a = builder.call(fma_v, [mv, builder.load(builder.gep(srows[t], [j]), align=4), a])
                            builder.store(builder.call(fma_v, [dv, builder.fadd(t01, t23), a]), acc[r][t])

            with builder.if_else(builder.icmp_unsigned("==", bits, c64(4))) as (four, eight):
                for branch, width in ((four, 4), (eight, 8)):
                    with branch:
                        with builder.if_else(builder.icmp_unsigned("!=", ma, c64(0))) as (with_m, without_m):
                            with with_m:
                                loop(width, True)
                            with without_m:
                                loop(width, False)
            orows = rows_of(oa, o_stride, tokens, F32)
            for t in range(tokens):
                for r in range(2):
                    builder.store(hsum(builder, builder.load(acc[r][t])), builder.gep(orows[t], [c64(r)]))
            return context.get_dummy_value()

        return sig, codegen

    return dot


_dot1, _dot2, _dot3, _dot4 = (_make_dot(t) for t in range(1, GROUP + 1))


@njit(cache=True)
def _lane_sums(x, s):
    """s [M, K / 4]: per block of 32 and lane l < 8, x[32j + l] + x[32j + 8 + l] + x[32j + 16 + l]
    + x[32j + 24 + l] (the offsets' term: sum_j m[r, j] * sum over the block of x)."""
    for t in range(x.shape[0]):
        for j in range(x.shape[1] // BLOCK):
            for lane in range(8):
                b = BLOCK * j + lane
                s[t, 8 * j + lane] = (x[t, b] + x[t, b + 8]) + (x[t, b + 16] + x[t, b + 24])


@njit(cache=True)
def _rows(x, s, q, d, m, has_m, bits, out, r0, r1):
    """Rows [r0, r1) (r1 - r0 even) of out [M, N] = x [M, K] @ dequant(q, d, m).T, tokens in
    groups of GROUP that share each widening of a row pair's codes."""
    nb = d.shape[1]
    q_stride = q.shape[1]  # bytes: the codes are 1-byte elements
    x_stride = x.shape[1] * 4
    s_stride = s.shape[1] * 4
    o_stride = out.shape[1] * 4
    xa = x.ctypes.data
    sa = s.ctypes.data
    qa = q.ctypes.data
    da = d.ctypes.data
    ma = m.ctypes.data
    oa = out.ctypes.data
    tokens = x.shape[0]
    for r in range(r0, r1, 2):
        mr = ma + r * nb * 4 if has_m else 0
        qr = qa + r * q_stride
        dr = da + r * nb * 4
        for t0 in range(0, tokens, GROUP):
            n = min(GROUP, tokens - t0)
            xt = xa + t0 * x_stride
            st = sa + t0 * s_stride
            ot = oa + t0 * o_stride + r * 4
            if n == 4:
                _dot4(bits, xt, x_stride, st, s_stride, qr, q_stride, dr, mr, nb, ot, o_stride)
            elif n == 3:
                _dot3(bits, xt, x_stride, st, s_stride, qr, q_stride, dr, mr, nb, ot, o_stride)
            elif n == 2:
                _dot2(bits, xt, x_stride, st, s_stride, qr, q_stride, dr, mr, nb, ot, o_stride)
            else:
                _dot1(bits, xt, x_stride, st, s_stride, qr, q_stride, dr, mr, nb, ot, o_stride)


@njit(cache=True, parallel=True)
def _qgemm(x, q, d, m, has_m, bits, out, nchunks):
    """out [M, N] = x [M, K] @ dequant(q, d, m).T; all C-contiguous float32 but the codes."""
    s = np.empty((x.shape[0], x.shape[1] // 4), np.float32)
    if has_m:
        _lane_sums(x, s)
    pairs = q.shape[0] // 2
    for c in prange(nchunks):
        _rows(x, s, q, d, m, has_m, bits, out, 2 * (c * pairs // nchunks), 2 * ((c + 1) * pairs // nchunks))


def qgemm(x: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray | None, bits: int, nchunks: int) -> np.ndarray:
    """x @ dequant(q, d, m).T for a few tokens: x [M, K] float32 (C-contiguous); W [N, K] =
    d * q + m per block of 32 along K, q in the ``bits`` layout (module docstring), d and m
    float32 [N, K / 32] (m None for the symmetric types); all C-contiguous, N even. Returns a
    new [M, N] float32 array. Reads the codes once for all M tokens (from cache for every
    group of GROUP after the first), so it pays while the step stays bound by memory."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    if x.ndim != 2 or x.shape[1] != d.shape[1] * BLOCK:
        raise ValueError(f"x must be [tokens, {d.shape[1] * BLOCK}], not {list(x.shape)}")
    out = np.empty((x.shape[0], q.shape[0]), np.float32)
    _qgemm(x, q, d, d if m is None else m, m is not None, bits, out, nchunks)
    return out


def qgemv(x: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray | None, bits: int, nchunks: int) -> np.ndarray:
    """`qgemm` for one token: x [K] → [N]."""
    return qgemm(x.reshape(1, -1), q, d, m, bits, nchunks)[0]


def unpack(q: np.ndarray, bits: int) -> np.ndarray:
    """The codes as one int16 per weight, [N, K] (references, tests)."""
    if bits == 8:
        return q.astype(np.int16)
    b = q.reshape(q.shape[0], -1, 2, 8)
    return np.concatenate([b & 0x0F, b >> 4], axis=3).reshape(q.shape[0], -1).astype(np.int16)


def warmup() -> None:
    """Compile (or load from the cache) with the exact argument types the model passes."""
    x = np.ones(BLOCK, np.float32)
    s = np.ones((2, 1), np.float32)
    for q, bits in ((np.ones((2, BLOCK), np.int8), 8), (np.ones((2, BLOCK // 2), np.uint8), 4)):
        qgemv(x, q, s, None, bits, 1)
        qgemv(x, q, s, s, bits, 1)
