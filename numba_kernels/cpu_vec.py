"""The two inner loops of CPU paged attention over 64-wide slices of a head, as LLVM vector IR
(Numba ``@intrinsic``s, as ``cpu_qmatmul`` does for its products).

Written as Numba loops, the P·V accumulator row went through memory on every key (a load and a
store per 8 lanes per key: Numba's arrays may alias, so LLVM cannot keep it in registers), and
each score re-read the query row. Here a 64-float slice of the query or of the accumulator sits
in eight AVX registers for the whole walk over a block's keys.

Both take addresses (``array.ctypes.data`` plus offsets) and strides in bytes; rows are float32.
The IR helpers below (types, constants, splat, fma) serve ``cpu_qmatmul`` too.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

WIDTH = 64  # floats per slice: eight 8-lane vectors

F32 = ir.FloatType()
I8 = ir.IntType(8)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
V8F = ir.VectorType(F32, 8)
_V4F = ir.VectorType(F32, 4)


def c64(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


def splat(builder: ir.IRBuilder, s: ir.Value) -> ir.Value:
    """s (float) in all 8 lanes."""
    undef = ir.Constant(V8F, ir.Undefined)
    v = builder.insert_element(undef, s, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(I32, 8), [0] * 8))


def fma(builder: ir.IRBuilder) -> ir.Function:
    """llvm.fma.v8f32 (a * b + c, one rounding), declared in the builder's module."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(V8F, [V8F] * 3), "llvm.fma.v8f32")


def _vec(builder: ir.IRBuilder, base: ir.Value, byte_offset: ir.Value, k: int) -> ir.Value:
    """The k-th 8-float vector of the row at base + byte_offset (unaligned load)."""
    p = builder.gep(builder.inttoptr(base, I8.as_pointer()), [byte_offset])
    return builder.load(builder.gep(builder.bitcast(p, V8F.as_pointer()), [c64(k)]), align=4)


def hsum(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    undef8 = ir.Constant(V8F, ir.Undefined)
    lo = builder.shuffle_vector(v, undef8, ir.Constant(ir.VectorType(I32, 4), [0, 1, 2, 3]))
    hi = builder.shuffle_vector(v, undef8, ir.Constant(ir.VectorType(I32, 4), [4, 5, 6, 7]))
    s4 = builder.fadd(lo, hi)
    undef4 = ir.Constant(_V4F, ir.Undefined)
    s2 = builder.fadd(s4, builder.shuffle_vector(s4, undef4, ir.Constant(ir.VectorType(I32, 4), [2, 3, 2, 3])))
    e0 = builder.extract_element(s2, ir.Constant(I32, 0))
    e1 = builder.extract_element(s2, ir.Constant(I32, 1))
    return builder.fadd(e0, e1)


@intrinsic
def scores64(typingctx, qa, ka, k_stride, n, out, accumulate):  # noqa: ANN001, ANN201, ARG001
    """out[t] (+)= dot(q[0:64], k_t[0:64]) for t < n, k_t at ka + t * k_stride; ``accumulate``
    nonzero adds to out[t] (later slices of a wider head), zero overwrites it."""
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
        qa, ka, k_stride, n, out, accumulate = args
        fma_v = fma(builder)
        q = [_vec(builder, qa, c64(0), k) for k in range(8)]
        outp = builder.inttoptr(out, F32.as_pointer())
        add = builder.icmp_unsigned("!=", accumulate, c64(0))
        with cgutils.for_range(builder, n) as it:
            t = it.index
            off = builder.mul(t, k_stride)
            kv = [_vec(builder, ka, off, k) for k in range(8)]
            a = builder.fmul(q[0], kv[0])
            b = builder.fmul(q[1], kv[1])
            for k in range(2, 8, 2):
                a = builder.call(fma_v, [q[k], kv[k], a])
                b = builder.call(fma_v, [q[k + 1], kv[k + 1], b])
            s = hsum(builder, builder.fadd(a, b))
            dst = builder.gep(outp, [t])
            builder.store(builder.select(add, builder.fadd(builder.load(dst), s), s), dst)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def weighted_sum64(typingctx, acc, pa, va, v_stride, n):  # noqa: ANN001, ANN201, ARG001
    """acc[0:64] += sum over t < n of p[t] * v_t[0:64], v_t at va + t * v_stride."""
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
        acc, pa, va, v_stride, n = args
        fma_v = fma(builder)
        regs = [cgutils.alloca_once_value(builder, _vec(builder, acc, c64(0), k)) for k in range(8)]
        pp = builder.inttoptr(pa, F32.as_pointer())
        with cgutils.for_range(builder, n) as it:
            t = it.index
            p = builder.load(builder.gep(pp, [t]))
            ps = splat(builder, p)
            off = builder.mul(t, v_stride)
            for k in range(8):
                builder.store(builder.call(fma_v, [ps, _vec(builder, va, off, k), builder.load(regs[k])]), regs[k])
        accp = builder.bitcast(builder.inttoptr(acc, I8.as_pointer()), V8F.as_pointer())
        for k in range(8):
            builder.store(builder.load(regs[k]), builder.gep(accp, [c64(k)]), align=4)
        return context.get_dummy_value()

    return sig, codegen
