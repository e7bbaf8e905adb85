"""Scalar building blocks for the CPU kernels, written so that LLVM vectorises the loops that
call them: bfloat16 <-> float32 bit conversions (LLVM intrinsics, because Numba promotes int32
arithmetic to int64 and has no scalar bit-cast), dtype-generic loads/stores, and a branch-free
``exp2`` (this build of Numba has no SVML, so ``math.exp`` would be a scalar libm call per score,
which measured slower than the dot products it follows).

Everything here is float32: a Python float literal inside a kernel is float64 and would silently
promote the whole expression, hence the ``np.float32`` module constants.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

# reassoc/contract let LLVM vectorise reductions and fuse multiply-adds; deliberately *not*
# 'nnan'/'ninf' (the f32->bf16 conversion keeps its NaN test, and -inf never reaches exp2).
FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}

F32_NEG_BIG = np.float32(-1.0e30)  # "minus infinity" that keeps m_old - m_new finite
_F32_MIN_EXP2 = np.float32(-126.0)  # 2**-126 is the smallest normal; below it the weight is 0
_F32_HALF = np.float32(0.5)
_F32_ONE = np.float32(1.0)
_F32_LN2 = np.float32(0.6931471805599453)
# Cephes expf polynomial for exp(u), |u| <= ln2/2: ~1 ulp.
_C0 = np.float32(5.0000001201e-1)
_C1 = np.float32(1.6666665459e-1)
_C2 = np.float32(4.1665795894e-2)
_C3 = np.float32(8.3334519073e-3)
_C4 = np.float32(1.3981999507e-3)
_C5 = np.float32(1.9875691500e-4)


@intrinsic
def bf16_to_f32(typingctx, bits):
    """int16/uint16 bfloat16 bits -> float32: zero-extend, shift into the high half, bit-cast."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def f32_to_bf16(typingctx, x):
    """float32 -> bfloat16 bits (int16), round to nearest even; NaN stays a (quiet) NaN."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        b = builder.bitcast(args[0], i32)
        lsb = builder.and_(builder.lshr(b, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        rounded = builder.add(b, builder.add(lsb, ir.Constant(i32, 0x7FFF)))
        hi = builder.trunc(builder.lshr(rounded, ir.Constant(i32, 16)), ir.IntType(16))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.select(is_nan, ir.Constant(ir.IntType(16), 0x7FC0), hi)

    return types.int16(x), codegen


@intrinsic
def _exp2_int(typingctx, n):
    """2**n as float32 for an integral float32 n in [-126, 127]: build the exponent field."""
    if n != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        e = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(e, ir.Constant(i32, 23)), ir.FloatType())

    return types.float32(n), codegen


@njit(cache=True, fastmath=FASTMATH)
def exp2(t):  # float32 -> float32, for t <= 0 (scores minus their running max, in log2 units)
    t = max(t, _F32_MIN_EXP2)
    n = np.floor(t + _F32_HALF)
    u = (t - n) * _F32_LN2
    z = u * u
    y = (((((_C5 * u + _C4) * u + _C3) * u + _C2) * u + _C1) * u + _C0) * z + u + _F32_ONE
    return y * _exp2_int(n)


def ld(a, i, j):  # pragma: no cover - replaced by the overload inside kernels
    """a[i, j] as float32, whether a holds float32 or bfloat16 bits (int16)."""
    raise NotImplementedError


def st(a, i, j, x):  # pragma: no cover - replaced by the overload inside kernels
    """a[i, j] = x (float32), rounding to bfloat16 when a holds bfloat16 bits (int16)."""
    raise NotImplementedError


@overload(ld)
def _ld_impl(a, i, j):
    if a.dtype == types.float32:
        return lambda a, i, j: a[i, j]
    if a.dtype == types.int16:
        return lambda a, i, j: bf16_to_f32(a[i, j])
    return None


@overload(st)
def _st_impl(a, i, j, x):
    if a.dtype == types.float32:
        def impl(a, i, j, x):
            a[i, j] = x
        return impl
    if a.dtype == types.int16:
        def impl(a, i, j, x):
            a[i, j] = f32_to_bf16(x)
        return impl
    return None


@intrinsic
def prefetch(typingctx, a, i):
    """Hint the hardware to fetch the cache line holding a.flat[i] (C-contiguous a) into L1:
    the next physical block is at an unpredictable address, so the stream prefetcher cannot
    guess it, and without the hint every block starts with a full memory latency."""
    if not isinstance(a, types.Array) or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.globals.get("llvm.prefetch.p0")
        if fn is None:
            fn = ir.Function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                          ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(a, i), codegen


def stage(a, row0, nrows, head0, nheads, stride, buf):  # pragma: no cover - overload below
    """Rows of a as float32: (array, first row). float32 caches are used in place; bfloat16
    rows row0 + t * stride + h (t < nrows, head0 <= h < head0 + nheads) are converted once
    into buf (at the same relative row), instead of once per query head of the GQA group."""
    raise NotImplementedError


@overload(stage)
def _stage_impl(a, row0, nrows, head0, nheads, stride, buf):
    if a.dtype == types.float32:
        return lambda a, row0, nrows, head0, nheads, stride, buf: (a, row0)
    if a.dtype == types.int16:
        def impl(a, row0, nrows, head0, nheads, stride, buf):
            dim = a.shape[1]
            for t in range(nrows):
                for h in range(head0, head0 + nheads):
                    for d in range(dim):
                        buf[t * stride + h, d] = bf16_to_f32(a[row0 + t * stride + h, d])
            return buf, 0
        return impl
    return None
