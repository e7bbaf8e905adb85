"""Matrix-vector products against block-quantized weights (GGUF's 32-element block types), for
the one token of a single sequence's decode step on the CPU.

Such a step reads every weight once for one token, so its linears are bound by memory: the
float32 weights of the default model are 540 MB per token, ~21 ms at this machine's ~26 GB/s.
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
on every block, which made the old kernel compute-bound well below memory speed. Here two rows
share each load of x, codes become floats in AVX2 registers (8 lanes), a block's four vectors
are summed before its scale is applied, the partial sums stay in registers (allocas that mem2reg
turns into SSA values) and each row prefetches ahead (the hardware prefetcher alone did not keep
a core busy on matrices larger than the cache). Parallel over chunks of rows; the
pool must be awake for this to pay (see ``numba_kernels.__init__``).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .cpu_vec import F32, I8, I32, V8F, c64, fma, splat

BLOCK = 32
# Bytes ahead of the current block that each row prefetches (1-4 KiB did alike in development
# timings; without prefetching, matrices larger than the cache were markedly slower).
PREFETCH_BYTES = 1152

def _make_dot2(bits: int):  # noqa: ANN202 (a Numba intrinsic)
    """An intrinsic: the dot products of two adjacent rows of codes with x, over nb blocks.
    Arguments: the addresses of x, of row r's codes, d and m (0: no offsets), the bytes from
    one row of codes to the next, and the blocks per row. Returns (y[r], y[r + 1])."""
    block_bytes = BLOCK * bits // 8

    @intrinsic
    def dot2(typingctx, xa, qa, q_stride, da, ma, nb):  # noqa: ANN001, ANN202, ARG001
        sig = types.UniTuple(types.float32, 2)(*[types.intp] * 6)

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
            xa, qa, q_stride, da, ma, nb = args
            mod = builder.module
            fma_v = fma(builder)
            prefetch = cgutils.get_or_insert_function(
                mod, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]), "llvm.prefetch.p0i8")
            xp = builder.inttoptr(xa, V8F.as_pointer())
            q0 = builder.inttoptr(qa, I8.as_pointer())
            qrows = [q0, builder.gep(q0, [q_stride])]
            d0 = builder.inttoptr(da, F32.as_pointer())
            drows = [d0, builder.gep(d0, [nb])]
            acc = [cgutils.alloca_once_value(builder, ir.Constant(V8F, None)) for _ in range(2)]
            macc = [cgutils.alloca_once_value(builder, ir.Constant(V8F, None)) for _ in range(2)]

            def codes(qrow: ir.Value, j: ir.Value) -> list[ir.Value]:
                base = builder.gep(qrow, [builder.mul(j, c64(block_bytes))])
                v8 = builder.bitcast(base, ir.VectorType(I8, 8).as_pointer())
                if bits == 8:
                    return [builder.sitofp(builder.load(builder.gep(v8, [c64(k)]), align=1), V8F) for k in range(4)]
                out = []
                for k in range(2):
                    w = builder.zext(builder.load(builder.gep(v8, [c64(k)]), align=1), ir.VectorType(I32, 8))
                    lo = builder.and_(w, ir.Constant(w.type, [0x0F] * 8))
                    hi = builder.lshr(w, ir.Constant(w.type, [4] * 8))
                    out += [builder.sitofp(lo, V8F), builder.sitofp(hi, V8F)]
                return out

            def loop(with_m: bool) -> None:
                mrows = None
                if with_m:
                    m0 = builder.inttoptr(ma, F32.as_pointer())
                    mrows = [m0, builder.gep(m0, [nb])]
                with cgutils.for_range(builder, nb) as it:
                    j = it.index
                    ahead = builder.add(builder.mul(j, c64(block_bytes)), c64(PREFETCH_BYTES))
                    for qrow in qrows:  # read, keep in all cache levels, data
                        flags = [ir.Constant(I32, v) for v in (0, 3, 1)]
                        builder.call(prefetch, [builder.gep(qrow, [ahead]), *flags])
                    xv = [builder.load(builder.gep(xp, [builder.add(builder.mul(j, c64(4)), c64(k))]), align=4)
                          for k in range(4)]
                    if mrows is not None:  # per-lane partial sums of x over the block
                        xsv = builder.fadd(builder.fadd(xv[0], xv[1]), builder.fadd(xv[2], xv[3]))
                    for r in range(2):
                        qf = codes(qrows[r], j)
                        t01 = builder.call(fma_v, [qf[1], xv[1], builder.fmul(qf[0], xv[0])])
                        t23 = builder.call(fma_v, [qf[3], xv[3], builder.fmul(qf[2], xv[2])])
                        dv = splat(builder, builder.load(builder.gep(drows[r], [j])))
                        builder.store(builder.call(fma_v, [dv, builder.fadd(t01, t23), builder.load(acc[r])]), acc[r])
                        if mrows is not None:
                            mv = splat(builder, builder.load(builder.gep(mrows[r], [j])))
                            builder.store(builder.call(fma_v, [mv, xsv, builder.load(macc[r])]), macc[r])

            with builder.if_else(builder.icmp_unsigned("!=", ma, c64(0))) as (with_m, without_m):
                with with_m:
                    loop(True)
                with without_m:
                    loop(False)
            out = []
            for r in range(2):
                v = builder.fadd(builder.load(acc[r]), builder.load(macc[r]))
                s = builder.extract_element(v, ir.Constant(I32, 0))
                for i in range(1, 8):
                    s = builder.fadd(s, builder.extract_element(v, ir.Constant(I32, i)))
                out.append(s)
            return context.make_tuple(builder, signature.return_type, out)

        return sig, codegen

    return dot2


_dot2_q8 = _make_dot2(8)
_dot2_q4 = _make_dot2(4)


@njit(cache=True)
def _rows(x, q, d, m, has_m, bits, out, r0, r1):
    """Rows [r0, r1) (r1 - r0 even) of out [N] = dequant(q, d, m) @ x [K]."""
    nb = d.shape[1]
    q_stride = q.shape[1]  # bytes: the codes are 1-byte elements
    xa = x.ctypes.data
    qa = q.ctypes.data
    da = d.ctypes.data
    ma = m.ctypes.data
    for r in range(r0, r1, 2):
        mr = ma + r * nb * 4 if has_m else 0
        if bits == 4:
            s0, s1 = _dot2_q4(xa, qa + r * q_stride, q_stride, da + r * nb * 4, mr, nb)
        else:
            s0, s1 = _dot2_q8(xa, qa + r * q_stride, q_stride, da + r * nb * 4, mr, nb)
        out[r] = s0
        out[r + 1] = s1


@njit(cache=True, parallel=True)
def _qgemv(x, q, d, m, has_m, bits, out, nchunks):
    pairs = q.shape[0] // 2
    for c in prange(nchunks):
        _rows(x, q, d, m, has_m, bits, out, 2 * (c * pairs // nchunks), 2 * ((c + 1) * pairs // nchunks))


def qgemv(x: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray | None, bits: int, nchunks: int) -> np.ndarray:
    """dequant(q, d, m) @ x for one token: x [K] float32 (contiguous); W [N, K] = d * q + m per
    block of 32 along K, q in the ``bits`` layout (module docstring), d and m float32
    [N, K / 32] (m None for the symmetric types); all C-contiguous, N even. Returns a new [N]
    float32 array."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    out = np.empty(q.shape[0], np.float32)
    _qgemv(x, q, d, d if m is None else m, m is not None, bits, out, nchunks)
    return out


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
