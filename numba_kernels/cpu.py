"""CPU (``numba.njit(parallel=True)``) kernels over the paged KV cache.

The public functions take numpy views of the torch tensors, already validated by the dispatcher
in ``numba_kernels/__init__.py``; bfloat16 tensors arrive as their int16 bits. Every kernel
accumulates in float32.

Attention (one kernel for decode and prefill): the work is cut into *items*, each one KV head of
one sequence, a tile of up to ``Q_TILE`` query tokens with the whole GQA group of query heads
(so every K/V row is read from memory once for all ``num_heads / num_kv_heads`` heads), and a
range of context positions. Decode-sized queries (one tile) over long contexts are also split
along the context (flash-decoding) so that a small batch still gives every thread work; their
partial (max, sum, accumulator) triples are merged afterwards. Items are packed onto threads by
the planner (longest first, onto the least-loaded thread) and the parallel loop runs over
*threads*, not items: Numba's static ``prange`` chunking would otherwise hand all the long
causal tiles of a prefill to the last thread. Within an item the context is walked block by
block with an online softmax in log2 units (``exp2`` of pre-scaled scores). For heads a multiple
of 64 wide, a block's scores and its P·V accumulation run in ``cpu_vec``'s vector-IR loops (the
query or accumulator slice held in registers).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from . import cpu_cache
from .cpu_math import F32_NEG_BIG, FASTMATH, exp2, ld, prefetch, st, stage
from .cpu_plan import _ERRORS, _H0, _HI, _J0, _LO, _NH, _NQ, _PART, _SEQ, ALL_HEADS_ROWS, Q_TILE, _check, _plan
from .cpu_vec import WIDTH, scores64, weighted_sum64

_LOG2E = 1.4426950408889634
# Batches whose sum over sequences of context x new tokens is at most this run serially: with
# the pool asleep, a parallel call costs ~60-110 µs more than a serial one on this 2-core VM,
# which breaks even at ~1000-2000 positions of one decode token (measured with the default
# model's shapes: `python benchmarks/attention.py --serial-sweep`).
SERIAL_WORK = 1024


@njit(cache=True, fastmath=FASTMATH)
def _prefetch_span(k, v, start, stop, line):
    """Prefetch elements [start, stop) of k and v (flat, C-contiguous): one hint per cache line
    (``line`` elements)."""
    for x in range(start, stop, line):
        prefetch(k, x)
        prefetch(v, x)


@njit(cache=True, fastmath=FASTMATH)
def _run_item(out, q, k, v, block_table, ctx, n, tok0, it, num_heads, num_kv_heads, block_size,
              scale, qs, acc, m, lsum, sc, kbuf, vbuf, part_m, part_l, part_acc):
    """One item: online softmax over context [lo, hi) of its rows.

    out, q: [num_tokens * num_heads, head_dim]; k, v: [num_blocks * block_size * num_kv_heads,
    head_dim] (float32, or int16 bfloat16 bits); block_table [max_blocks] int32. Scratch:
    qs, acc [rows, head_dim]; m, lsum [rows]; sc [block_size]; kbuf, vbuf [block_size *
    num_kv_heads, head_dim] (bfloat16 staging); part_m, part_l [partials * rows], part_acc
    [partials * rows, head_dim]. Row r = (kv head hh * nq + token jj) * group + g.
    """
    h0 = it[_H0]
    nh = it[_NH]
    j0 = it[_J0]
    nq = it[_NQ]
    lo = it[_LO]
    hi = it[_HI]
    group = num_heads // num_kv_heads
    dim = q.shape[1]
    rows = nh * nq * group
    first_pos = ctx - n + j0  # absolute position of the tile's first query token
    line = 64 // k.itemsize
    block_elems = block_size * num_kv_heads * dim
    per_row = (block_elems // line + rows - 1) // rows * line  # prefetch share, whole lines

    for r in range(rows):
        hh = r // (nq * group)
        jj = (r // group) % nq
        qrow = (tok0 + j0 + jj) * num_heads + (h0 + hh) * group + r % group
        for d in range(dim):
            qs[r, d] = ld(q, qrow, d) * scale
            acc[r, d] = 0.0
        m[r] = F32_NEG_BIG
        lsum[r] = 0.0

    # Heads a multiple of 64 wide take the vector-IR loops; qs, acc and sc are C-contiguous
    # float32 scratch ([rows, dim], [block_size]), and so is every kf / vf row.
    vec = dim % WIDTH == 0
    qs_a = qs.ctypes.data
    acc_a = acc.ctypes.data
    sc_a = sc.ctypes.data

    b_first = lo // block_size
    b_end = (hi + block_size - 1) // block_size
    for b in range(b_first, b_end):
        t_lo = max(lo, b * block_size)
        t_hi = min(hi, (b + 1) * block_size)
        cnt = t_hi - t_lo
        # Rows of this block's first used slot, all heads: [cnt * num_kv_heads, head_dim].
        row0 = (block_table[b] * block_size + t_lo - b * block_size) * num_kv_heads
        # The next physical block is at an unpredictable address, so the hardware prefetcher
        # cannot guess it: hint it, a share per query row of this block. Issued all at once,
        # its 2 x 192 lines overflowed the core's few outstanding-miss buffers and the loads
        # stalled until memory answered (spreading them took the large points of
        # benchmarks/attention.py from 1.15-1.30x to 0.87-0.90x contiguous SDPA's time).
        nxt = -1
        if b + 1 < b_end:
            nxt = block_table[b + 1] * block_elems
        kf, koff = stage(k, row0, cnt, h0, nh, num_kv_heads, kbuf)
        vf, voff = stage(v, row0, cnt, h0, nh, num_kv_heads, vbuf)
        for r in range(rows):
            if nxt >= 0:
                _prefetch_span(k, v, nxt + r * per_row, min(nxt + (r + 1) * per_row,
                                                            nxt + block_elems), line)
            hh = r // (nq * group)
            jj = (r // group) % nq
            # Causal: row r is the query at position first_pos + jj.
            e = min(t_hi, first_pos + jj + 1)
            if e <= t_lo:
                continue
            c = e - t_lo
            kr0 = koff + h0 + hh
            vr0 = voff + h0 + hh
            bmax = F32_NEG_BIG
            if vec:  # 64-float slices in registers (cpu_vec)
                row_bytes = num_kv_heads * dim * 4
                for d0 in range(0, dim, WIDTH):
                    scores64(qs_a + (r * dim + d0) * 4, kf.ctypes.data + (kr0 * dim + d0) * 4,
                             row_bytes, c, sc_a, d0)
                for t in range(c):
                    bmax = max(bmax, sc[t])
            else:
                for t in range(c):
                    kr = kr0 + t * num_kv_heads
                    s = np.float32(0.0)
                    for d in range(dim):
                        s += qs[r, d] * kf[kr, d]
                    sc[t] = s
                    bmax = max(bmax, s)
            m_new = max(m[r], bmax)
            alpha = exp2(m[r] - m_new)
            m[r] = m_new
            total = np.float32(0.0)
            for t in range(c):
                p = exp2(sc[t] - m_new)
                sc[t] = p
                total += p
            lsum[r] = lsum[r] * alpha + total
            for d in range(dim):
                acc[r, d] *= alpha
            if vec:
                row_bytes = num_kv_heads * dim * 4
                for d0 in range(0, dim, WIDTH):
                    weighted_sum64(acc_a + (r * dim + d0) * 4, sc_a, vf.ctypes.data + (vr0 * dim + d0) * 4,
                                   row_bytes, c)
            else:
                for t in range(c):
                    vr = vr0 + t * num_kv_heads
                    p = sc[t]
                    for d in range(dim):
                        acc[r, d] += p * vf[vr, d]

    part = it[_PART]
    for r in range(rows):
        if part < 0:
            hh = r // (nq * group)
            jj = (r // group) % nq
            orow = (tok0 + j0 + jj) * num_heads + (h0 + hh) * group + r % group
            inv = np.float32(1.0) / lsum[r]
            for d in range(dim):
                st(out, orow, d, acc[r, d] * inv)
        else:
            pr = part * ALL_HEADS_ROWS + r
            part_m[pr] = m[r]
            part_l[pr] = lsum[r]
            for d in range(dim):
                part_acc[pr, d] = acc[r, d]


@njit(cache=True, fastmath=FASTMATH)
def _merge(out, part_m, part_l, part_acc, merges, query_start_loc, num_heads, num_kv_heads):
    """Merge the context slices of split chunks (few: only small batches are split).

    out: [num_tokens * num_heads, head_dim]; part_m, part_l: [partials * ALL_HEADS_ROWS];
    part_acc: [partials * ALL_HEADS_ROWS, head_dim]; merges: [m, 4] from _plan."""
    dim = out.shape[1]
    group = num_heads // num_kv_heads
    o = np.empty(dim, np.float32)
    for g in range(merges.shape[0]):
        i = merges[g, 0]
        rows = merges[g, 1]
        p0 = merges[g, 2]
        nparts = merges[g, 3]
        tok0 = query_start_loc[i]
        nq = rows // num_heads
        for r in range(rows):
            mx = F32_NEG_BIG
            for p in range(nparts):
                mx = max(mx, part_m[(p0 + p) * ALL_HEADS_ROWS + r])
            total = np.float32(0.0)
            for d in range(dim):
                o[d] = 0.0
            for p in range(nparts):
                pr = (p0 + p) * ALL_HEADS_ROWS + r
                w = exp2(part_m[pr] - mx)
                total += part_l[pr] * w
                for d in range(dim):
                    o[d] += part_acc[pr, d] * w
            hh = r // (nq * group)
            jj = (r // group) % nq
            orow = (tok0 + jj) * num_heads + hh * group + r % group
            inv = np.float32(1.0) / total
            for d in range(dim):
                st(out, orow, d, o[d] * inv)


@njit(cache=True, fastmath=FASTMATH)
def _thread(t, out, q, k, v, block_tables, context_lens, query_start_loc, num_heads, num_kv_heads,
            block_size, scale, items, order, bounds, part_m, part_l, part_acc):
    """Thread t's share of _attention: items order[bounds[t]:bounds[t + 1]]."""
    group = num_heads // num_kv_heads
    dim = q.shape[1]
    rows = max(ALL_HEADS_ROWS, Q_TILE * group)
    # Per-thread scratch, reused by all of this thread's items (stays in L1/L2).
    qs = np.empty((rows, dim), np.float32)
    acc = np.empty((rows, dim), np.float32)
    m = np.empty(rows, np.float32)
    lsum = np.empty(rows, np.float32)
    sc = np.empty(block_size, np.float32)
    kbuf = np.empty((block_size * num_kv_heads, dim), np.float32)
    vbuf = np.empty((block_size * num_kv_heads, dim), np.float32)
    for x in range(bounds[t], bounds[t + 1]):
        it = items[order[x]]
        i = it[_SEQ]
        tok0 = np.int64(query_start_loc[i])
        n = np.int64(query_start_loc[i + 1]) - tok0
        _run_item(out, q, k, v, block_tables[i], np.int64(context_lens[i]), n, tok0, it,
                  num_heads, num_kv_heads, block_size, scale, qs, acc, m, lsum, sc, kbuf,
                  vbuf, part_m, part_l, part_acc)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _attention(out, q, k, v, block_tables, context_lens, query_start_loc, num_heads, num_kv_heads,
               block_size, scale, nthreads, serial_work):
    """out, q: [num_tokens * num_heads, head_dim]; k, v: [num_blocks * block_size * num_kv_heads,
    head_dim]; block_tables [num_seqs, max_blocks] int32; context_lens [num_seqs] int32;
    query_start_loc [num_seqs + 1] int32; scale already includes log2(e). Returns 0, or an
    _ERRORS code without touching out."""
    err = _check(block_tables, context_lens, query_start_loc, q.shape[0] // num_heads,
                 k.shape[0] // (block_size * num_kv_heads), block_size)
    if err:
        return err
    # Small batches run on the calling thread alone: waking the pool (sleeping threads, see
    # OMP_WAIT_POLICY in __init__) costs more than it saves below serial_work.
    work = 0
    for i in range(context_lens.shape[0]):
        work += np.int64(context_lens[i]) * (query_start_loc[i + 1] - query_start_loc[i])
    if work <= serial_work:
        nthreads = 1
    items, order, bounds, merges, npart = _plan(context_lens, query_start_loc, num_heads,
                                                num_kv_heads, block_size, nthreads)
    dim = q.shape[1]
    part_m = np.empty(max(npart, 1) * ALL_HEADS_ROWS, np.float32)
    part_l = np.empty(max(npart, 1) * ALL_HEADS_ROWS, np.float32)
    part_acc = np.empty((max(npart, 1) * ALL_HEADS_ROWS, dim), np.float32)
    scale32 = np.float32(scale)

    if nthreads == 1:
        _thread(0, out, q, k, v, block_tables, context_lens, query_start_loc, num_heads,
                num_kv_heads, block_size, scale32, items, order, bounds, part_m, part_l, part_acc)
    else:
        for t in prange(nthreads):
            # The body is a separate function so that the parfor passes (slow: they analyse
            # every statement of the loop body) see one call; it halves the cold compile time.
            _thread(t, out, q, k, v, block_tables, context_lens, query_start_loc, num_heads,
                    num_kv_heads, block_size, scale32, items, order, bounds, part_m, part_l,
                    part_acc)

    _merge(out, part_m, part_l, part_acc, merges, query_start_loc, num_heads, num_kv_heads)
    return 0


def attention(out: np.ndarray, query: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
              block_tables: np.ndarray, context_lens: np.ndarray, query_start_loc: np.ndarray,
              scale: float, nthreads: int | None = None, serial_work: int = SERIAL_WORK) -> None:
    """Paged causal attention for chunks of new tokens (decode = chunks of one).

    nthreads: how many shares to plan for (default: Numba's thread count; tests vary it).
    serial_work: batches with sum(context_len x new tokens) up to this run on the calling
    thread (tests pass 0 to drive the parallel path with small inputs).

    out, query: [num_tokens, num_heads, head_dim]; caches: [num_blocks, block_size,
    num_kv_heads, head_dim]; float32 or int16 (bfloat16 bits), all the same dtype.
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    err = _attention(out.reshape(-1, head_dim), query.reshape(-1, head_dim),
                     k_cache.reshape(-1, head_dim), v_cache.reshape(-1, head_dim), block_tables,
                     context_lens, query_start_loc, num_heads, num_kv_heads, block_size,
                     float(scale) * _LOG2E, nthreads or numba.get_num_threads(), serial_work)
    if err:
        raise ValueError(_ERRORS[err])


def warmup(dtype: object = "float32") -> None:
    """Compile (or load from the cache) every kernel for one cache dtype ("float32", or
    "bfloat16" / int16 bits) with the exact argument types the dispatcher passes."""
    np_dtype = np.int16 if str(dtype) in ("bfloat16", "torch.bfloat16", "int16") else np.float32
    nkv, dim, bs = 1, 8, 8
    k = np.zeros((2, bs, nkv, dim), np_dtype)
    v = np.zeros_like(k)
    x = np.zeros((2, nkv, dim), np_dtype)
    cpu_cache.write_kv_cache(x, x, k, v, np.array([0, -1], np.int64))
    cpu_cache.copy_blocks(k, v, np.array([0], np.int64), np.array([1], np.int64))
    tables = np.array([[0, 1]], np.int32)
    # Two tokens of one sequence: exercises the split path on a multi-threaded pool too.
    attention(np.zeros((2, nkv, dim), np_dtype), np.zeros((2, nkv, dim), np_dtype), k, v, tables,
              np.array([2 * bs], np.int32), np.array([0, 2], np.int32), 1.0)
