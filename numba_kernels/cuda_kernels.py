"""Raw numba.cuda kernels over the paged KV cache, their explicit signatures, and the dtype helpers
they share. The torch-facing wrappers live in `numba_kernels.cuda`.

Why no `@cuda.jit(device=True)` helpers: numba-cuda compiles a device function for the *current
device's* compute capability, so a kernel that calls one cannot be compiled by
`cuda.compile_ptx(..., cc=(9, 0))` on a machine without a GPU (CI). Shared code is therefore
written inline, and the only per-dtype operations (element -> float32 and back) are
`@intrinsic`s, which are typed and lowered without a device. Under the CUDA simulator
(`NUMBA_ENABLE_CUDASIM=1`) intrinsics cannot run, so plain-Python twins are used instead.

bfloat16: torch bf16 tensors expose no `__cuda_array_interface__` (numpy has no bf16), so the
wrappers pass them as int16 views and these kernels convert the bits: `bits << 16` to float32,
and round-to-nearest-even (NaN -> quiet NaN) back. float16 and float32 are native.

Attention (decode and prefill share one kernel, vLLM paged attention v1/v2 = flash-decoding):
one thread block per (query token, kv head, context partition). It handles all `G = num_heads /
num_kv_heads` query heads of its kv head, so each K/V element is read from memory once per
partition rather than once per query head. Within a partition:
  1. the G pre-scaled query vectors go to shared memory;
  2. K is staged through shared memory one tile of TILE positions at a time (coalesced loads,
     rows padded to D+1 floats so a warp reading one column hits 32 different banks), and each
     thread computes whole dot products for (head, position) pairs: no cross-lane reductions
     are needed, hence no warp shuffles (which the simulator lacks);
  3. max and sum of exp over the partition: shared-memory tree reductions, all heads at once;
  4. thread d accumulates sum_t p[g, t] * V[t, d] for every head g, four positions per step so
     that four independent loads are in flight.
With one partition (v1) the block writes the normalized output; with several (v2) it writes
its partial output (normalized by its own sum), max and sum, and `combine_kernel` merges them.
Dynamic shared memory layout (float32): q [G*D] | p [G*(P+4)] | K tile [TILE*(D+1)] | red [G*NT].
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32
from numba.cuda import config as _cuda_config
from numba.cuda import types

SIMULATOR = bool(_cuda_config.ENABLE_CUDASIM)

MAX_GROUP = 8  # query heads per kv head (GQA ratio); the size of a per-thread accumulator
PAD = 4  # extra zeroed entries per head's probability row: the V loop reads 4 positions a step

if SIMULATOR:

    def to_f32(x):
        """Element -> float32 (int16 = bfloat16 bits)."""
        if isinstance(x, np.int16):
            return np.array([(int(x) & 0xFFFF) << 16], dtype=np.uint32).view(np.float32)[0]
        return np.float32(x)

    def from_f32(v, arr):
        """float32 -> the element type of `arr` (int16 = bfloat16 bits, round to nearest even)."""
        if arr.dtype == np.int16:
            f = np.float32(v)
            if f != f:
                return np.int16(0x7FC0)
            bits = int(np.array([f], dtype=np.float32).view(np.uint32)[0])
            r = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
            return np.array([r], dtype=np.uint16).view(np.int16)[0]
        return arr.dtype.type(v)

else:
    from llvmlite import ir
    from numba.cuda.extending import intrinsic

    @intrinsic
    def to_f32(typingctx, x):
        """Element -> float32 (int16 = bfloat16 bits)."""
        if isinstance(x, types.Integer) and x.bitwidth == 16:

            def codegen(context, builder, sig, args):
                i32 = ir.IntType(32)
                v = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
                return builder.bitcast(v, ir.FloatType())

            return types.float32(x), codegen
        if isinstance(x, types.Float):

            def codegen(context, builder, sig, args):
                return context.cast(builder, args[0], x, types.float32)

            return types.float32(x), codegen
        return None

    @intrinsic
    def from_f32(typingctx, v, arr):
        """float32 -> the element type of `arr` (int16 = bfloat16 bits, round to nearest even)."""
        dt = arr.dtype
        if isinstance(dt, types.Integer) and dt.bitwidth == 16:

            def codegen(context, builder, sig, args):
                i32, i16 = ir.IntType(32), ir.IntType(16)
                f = context.cast(builder, args[0], v, types.float32)
                bits = builder.bitcast(f, i32)
                lsb = builder.and_(builder.lshr(bits, ir.Constant(i32, 16)), ir.Constant(i32, 1))
                r = builder.add(builder.add(bits, ir.Constant(i32, 0x7FFF)), lsb)
                r = builder.trunc(builder.lshr(r, ir.Constant(i32, 16)), i16)
                isnan = builder.fcmp_unordered("uno", f, f)
                return builder.select(isnan, ir.Constant(i16, 0x7FC0), r)

            return dt(v, arr), codegen

        def codegen(context, builder, sig, args):
            return context.cast(builder, args[0], v, dt)

        return dt(v, arr), codegen


def attention_kernel(out, part_out, part_max, part_sum, query, k_cache, v_cache, block_tables,
                     context_lens, query_start_loc, scale, decode, partition_size, tile, split):
    # out:          [num_tokens, num_heads, D]             (v1: written; v2: untouched)
    # part_out:     [num_tokens, num_heads, num_parts, D] f32 (v2 only; else any dummy)
    # part_max/sum: [num_tokens, num_heads, num_parts] f32   (v2 only)
    # query:        [num_tokens, num_heads, D]
    # k/v_cache:    [num_blocks, block_size, num_kv_heads, D]
    # block_tables: [num_seqs, max_blocks] int32; context_lens [num_seqs] int32
    # query_start_loc: [num_seqs + 1] int32 (ignored when decode: token i is sequence i)
    # grid (num_tokens, num_kv_heads, num_parts); block NT threads (a power of two)
    tok = cuda.blockIdx.x
    kvh = cuda.blockIdx.y
    part = cuda.blockIdx.z
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    head_dim = query.shape[2]
    group = query.shape[1] // k_cache.shape[2]
    bs = k_cache.shape[1]

    # Which sequence, and how many cache positions this token attends to (causal).
    if decode:
        seq = tok
        length = context_lens[seq]
    else:
        lo = 0
        hi = context_lens.shape[0]  # invariant: qsl[lo] <= tok < qsl[hi]; empty seqs repeat qsl
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if query_start_loc[mid] <= tok:
                lo = mid
            else:
                hi = mid
        seq = lo
        n_new = query_start_loc[seq + 1] - query_start_loc[seq]
        length = context_lens[seq] - n_new + (tok - query_start_loc[seq]) + 1
    start = part * partition_size
    if start >= length:
        return  # uniform across the block: nothing of this token lies in this partition
    end = min(start + partition_size, length)
    n = end - start

    lp = partition_size + 4  # PAD
    q0 = 0
    p0 = q0 + group * head_dim
    k0 = p0 + group * lp
    r0 = k0 + tile * (head_dim + 1)
    sm = cuda.shared.array(0, dtype=float32)

    for i in range(tid, group * head_dim, nt):
        g = i // head_dim
        sm[q0 + i] = to_f32(query[tok, kvh * group + g, i - g * head_dim]) * scale
    cuda.syncthreads()

    # 2. logits, one K tile at a time. Positions past `end` are clamped to end-1 (a valid cache
    # slot) so the four loads need no branch; their logits are never stored.
    tile_elems = tile * head_dim
    for t0 in range(start, end, tile):
        for i in range(tid, tile_elems, 4 * nt):
            ia = i
            ib = i + nt
            ic = i + 2 * nt
            id_ = i + 3 * nt
            ta = ia // head_dim
            tb = ib // head_dim
            tc = ic // head_dim
            td = id_ // head_dim
            pa = min(t0 + ta, end - 1)
            pb = min(t0 + tb, end - 1)
            pc = min(t0 + tc, end - 1)
            pd = min(t0 + td, end - 1)
            xa = k_cache[block_tables[seq, pa // bs], pa % bs, kvh, ia - ta * head_dim]
            xb = k_cache[block_tables[seq, pb // bs], pb % bs, kvh, ib - tb * head_dim]
            xc = k_cache[block_tables[seq, pc // bs], pc % bs, kvh, ic - tc * head_dim]
            xd = k_cache[block_tables[seq, pd // bs], pd % bs, kvh, id_ - td * head_dim]
            # Host guarantees tile*D % (4*NT) == 0, so all four indices are inside the tile.
            sm[k0 + ta * (head_dim + 1) + ia - ta * head_dim] = to_f32(xa)
            sm[k0 + tb * (head_dim + 1) + ib - tb * head_dim] = to_f32(xb)
            sm[k0 + tc * (head_dim + 1) + ic - tc * head_dim] = to_f32(xc)
            sm[k0 + td * (head_dim + 1) + id_ - td * head_dim] = to_f32(xd)
        cuda.syncthreads()
        for i in range(tid, tile * group, nt):
            g = i // tile  # warp-uniform when tile >= 32: q reads are broadcasts
            t = i - g * tile
            if t0 + t < end:
                acc = float32(0.0)
                qb = q0 + g * head_dim
                kb = k0 + t * (head_dim + 1)
                for d in range(head_dim):
                    acc += sm[qb + d] * sm[kb + d]
                sm[p0 + g * lp + t0 + t - start] = acc
        cuda.syncthreads()  # before the next tile overwrites K

    # 3. max over the partition, all heads at once.
    for g in range(group):
        m = float32(-math.inf)
        for j in range(tid, n, nt):
            m = max(m, sm[p0 + g * lp + j])
        sm[r0 + g * nt + tid] = m
    cuda.syncthreads()
    s = nt // 2
    while s > 0:
        if tid < s:
            for g in range(group):
                sm[r0 + g * nt + tid] = max(sm[r0 + g * nt + tid], sm[r0 + g * nt + tid + s])
        cuda.syncthreads()
        s //= 2
    mloc = cuda.local.array(MAX_GROUP, float32)
    for g in range(group):
        mloc[g] = sm[r0 + g * nt]
    cuda.syncthreads()  # everyone holds the maxima before `red` is reused for the sums
    # exp in place; zero the padding the V loop reads past n.
    for g in range(group):
        tot = float32(0.0)
        for j in range(tid, n, nt):
            e = math.exp(sm[p0 + g * lp + j] - mloc[g])
            sm[p0 + g * lp + j] = e
            tot += e
        if tid < 4:
            sm[p0 + g * lp + n + tid] = 0.0
        sm[r0 + g * nt + tid] = tot
    cuda.syncthreads()
    s = nt // 2
    while s > 0:
        if tid < s:
            for g in range(group):
                sm[r0 + g * nt + tid] += sm[r0 + g * nt + tid + s]
        cuda.syncthreads()
        s //= 2

    # 4. P @ V: thread d owns output column d for every head.
    acc_v = cuda.local.array(MAX_GROUP, float32)
    for d in range(tid, head_dim, nt):
        for g in range(group):
            acc_v[g] = 0.0
        for j in range(0, n, 4):
            pa = start + j
            pb = min(pa + 1, end - 1)
            pc = min(pa + 2, end - 1)
            pd = min(pa + 3, end - 1)
            va = to_f32(v_cache[block_tables[seq, pa // bs], pa % bs, kvh, d])
            vb = to_f32(v_cache[block_tables[seq, pb // bs], pb % bs, kvh, d])
            vc = to_f32(v_cache[block_tables[seq, pc // bs], pc % bs, kvh, d])
            vd = to_f32(v_cache[block_tables[seq, pd // bs], pd % bs, kvh, d])
            for g in range(group):
                pr = p0 + g * lp + j
                acc_v[g] += sm[pr] * va + sm[pr + 1] * vb + sm[pr + 2] * vc + sm[pr + 3] * vd
        for g in range(group):
            h = kvh * group + g
            tot = sm[r0 + g * nt]
            if split:
                part_out[tok, h, part, d] = acc_v[g] / tot
            else:
                out[tok, h, d] = from_f32(acc_v[g] / tot, out)
    if split and tid < group:
        part_max[tok, kvh * group + tid, part] = mloc[tid]
        part_sum[tok, kvh * group + tid, part] = sm[r0 + tid * nt]


def combine_kernel(out, part_out, part_max, part_sum, context_lens, query_start_loc, decode,
                   partition_size):
    # out [num_tokens, num_heads, D]; part_* as in attention_kernel.
    # grid (num_tokens, num_heads); block NT threads. Each thread recomputes the partition
    # weights (a handful of exps) rather than sharing them: no shared memory, no barrier.
    tok = cuda.blockIdx.x
    h = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    head_dim = out.shape[2]
    if decode:
        length = context_lens[tok]
    else:
        lo = 0
        hi = context_lens.shape[0]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if query_start_loc[mid] <= tok:
                lo = mid
            else:
                hi = mid
        n_new = query_start_loc[lo + 1] - query_start_loc[lo]
        length = context_lens[lo] - n_new + (tok - query_start_loc[lo]) + 1
    nparts = (length + partition_size - 1) // partition_size
    gmax = float32(-math.inf)
    for p in range(nparts):
        gmax = max(gmax, part_max[tok, h, p])
    wsum = float32(0.0)
    for p in range(nparts):
        wsum += part_sum[tok, h, p] * math.exp(part_max[tok, h, p] - gmax)
    for d in range(tid, head_dim, nt):
        acc = float32(0.0)
        for p in range(nparts):
            acc += part_sum[tok, h, p] * math.exp(part_max[tok, h, p] - gmax) * part_out[tok, h, p, d]
        out[tok, h, d] = from_f32(acc / wsum, out)


def write_kv_kernel(key, value, k_cache, v_cache, slot_mapping):
    # key/value [num_tokens, num_kv_heads, D]; caches [num_blocks, block_size, num_kv_heads, D]
    # slot_mapping [num_tokens] int64 (-1 = skip). grid (num_tokens,); block NT threads.
    # Same element type on both sides (bf16 as int16 bits): a plain copy, no conversion.
    t = cuda.blockIdx.x
    slot = slot_mapping[t]
    if slot < 0:
        return
    bs = k_cache.shape[1]
    blk = slot // bs
    off = slot - blk * bs
    head_dim = key.shape[2]
    for i in range(cuda.threadIdx.x, key.shape[1] * head_dim, cuda.blockDim.x):
        h = i // head_dim
        d = i - h * head_dim
        k_cache[blk, off, h, d] = key[t, h, d]
        v_cache[blk, off, h, d] = value[t, h, d]


def copy_blocks_kernel(k_cache, v_cache, src, dst):
    # caches viewed as [num_blocks, block_size * num_kv_heads * D]; src/dst [n] int64.
    # grid (n,); block NT threads.
    i = cuda.blockIdx.x
    s = src[i]
    d = dst[i]
    for e in range(cuda.threadIdx.x, k_cache.shape[1], cuda.blockDim.x):
        k_cache[d, e] = k_cache[s, e]
        v_cache[d, e] = v_cache[s, e]


# Element types: bfloat16 travels as int16 bits (see module docstring).
ELEMENT_TYPES = {"float16": types.float16, "bfloat16": types.int16, "float32": types.float32}


def _a(dt, ndim: int, layout: str = "C"):
    return types.Array(dt, ndim, layout)


def signature(kernel: str, dtype: str) -> tuple:
    """The explicit argument types of `kernel` for element dtype name `dtype`. Query, key, value
    and out may be strided views (layout "A", e.g. slices of a fused qkv); caches, tables and
    scratch buffers must be contiguous."""
    dt = ELEMENT_TYPES[dtype]
    f32, i32, i64 = types.float32, types.int32, types.int64
    if kernel == "attention":
        return (_a(dt, 3, "A"), _a(f32, 4), _a(f32, 3), _a(f32, 3), _a(dt, 3, "A"), _a(dt, 4),
                _a(dt, 4), _a(i32, 2), _a(i32, 1), _a(i32, 1), f32, i32, i32, i32, i32)
    if kernel == "combine":
        return (_a(dt, 3, "A"), _a(f32, 4), _a(f32, 3), _a(f32, 3), _a(i32, 1), _a(i32, 1), i32, i32)
    if kernel == "write_kv":
        return (_a(dt, 3, "A"), _a(dt, 3, "A"), _a(dt, 4), _a(dt, 4), _a(i64, 1))
    if kernel == "copy_blocks":
        return (_a(dt, 2), _a(dt, 2), _a(i64, 1), _a(i64, 1))
    raise KeyError(kernel)


KERNELS = {
    "attention": attention_kernel,
    "combine": combine_kernel,
    "write_kv": write_kv_kernel,
    "copy_blocks": copy_blocks_kernel,
}
