"""Planning a CPU attention call: checking the paged metadata, cutting the work into items
(a KV head (or all of them) of one sequence, a tile of query tokens, a range of context) and
packing them onto threads longest first (see ``cpu``'s module doc)."""
from __future__ import annotations

import numpy as np
from numba import njit

# Query tokens per prefill item: Q_TILE * group rows share each K/V block while it sits in L1.
Q_TILE = 16
# Chunks with at most this many (token, head) rows are run as one item over all KV heads, so a
# physical block (block_size * num_kv_heads * head_dim contiguous values) is read as one piece.
ALL_HEADS_ROWS = 64
# Shortest context slice worth a separate item (the merge and the item overhead cost about as
# much as reading a few dozen rows).
MIN_SPLIT = 64
# Items per thread to aim for when splitting contexts: enough that the longest-first packing
# balances, few enough that the merge stays negligible.
ITEMS_PER_THREAD = 4
# Columns of the item table: sequence, first KV head, KV heads, first token of the tile (within
# the sequence's chunk), tokens in the tile, context range [lo, hi), partial slot or -1.
_SEQ, _H0, _NH, _J0, _NQ, _LO, _HI, _PART = range(8)
_NCOL = 8


@njit(cache=True)
def _argsort_desc(key):
    """Indices of key [n] float64, largest first: a shell sort, because np.argsort costs
    ~2.5 s of compile time and n is only the number of items."""
    n = key.shape[0]
    idx = np.arange(n)
    gap = 1
    while gap < n // 3:
        gap = 3 * gap + 1
    while gap >= 1:
        for i in range(gap, n):
            cur = idx[i]
            j = i
            while j >= gap and key[idx[j - gap]] < key[cur]:
                idx[j] = idx[j - gap]
                j -= gap
            idx[j] = cur
        gap //= 3
    return idx


@njit(cache=True)
def _check(block_tables, context_lens, query_start_loc, num_tokens, num_blocks, block_size):
    """0, or the code of the first inconsistency (see _ERRORS): an index that would read out of
    bounds. O(blocks in use), so it runs on every call instead of being trusted."""
    if query_start_loc[0] != 0 or query_start_loc[query_start_loc.shape[0] - 1] != num_tokens:
        return 1
    for i in range(context_lens.shape[0]):
        n = query_start_loc[i + 1] - query_start_loc[i]
        ctx = context_lens[i]
        if n < 0:
            return 1
        if n > ctx:
            return 2
        if n == 0:
            continue
        nblk = (ctx + block_size - 1) // block_size
        if nblk > block_tables.shape[1]:
            return 3
        for b in range(nblk):
            if block_tables[i, b] < 0 or block_tables[i, b] >= num_blocks:
                return 4
    return 0


_ERRORS = {
    1: "query_start_loc must rise (non-decreasing) from 0 to num_tokens",
    2: "context_lens must be >= each sequence's number of new tokens (they are in the cache)",
    3: "context_lens exceeds what block_tables has room for (max_blocks * block_size)",
    4: "block_tables refers to a block outside the cache within a sequence's context",
}


@njit(cache=True)
def _plan(context_lens, query_start_loc, num_heads, num_kv_heads, block_size, nthreads):
    """Cut the batch into items and pack them onto threads.

    context_lens [num_seqs] int32, query_start_loc [num_seqs + 1] int32. Returns (items [n, 8]
    int64, order [n] int64: item indices grouped by thread, bounds [nthreads + 1] int64: thread
    t runs order[bounds[t]:bounds[t + 1]], merges [m, 4] int64: (seq, rows, first partial,
    partial count) of split chunks, num_partials).
    """
    num_seqs = context_lens.shape[0]
    group = num_heads // num_kv_heads
    # Split the context of all-heads chunks only as far as needed to give each thread a few
    # items; longer chunks are parallel enough through their query tiles and heads.
    short_ctx = 0
    total = 0
    for i in range(num_seqs):
        n = query_start_loc[i + 1] - query_start_loc[i]
        if n <= 0:
            continue
        if n * num_heads <= ALL_HEADS_ROWS:
            short_ctx += context_lens[i]
            total += 1
        else:
            total += (n + Q_TILE - 1) // Q_TILE * num_kv_heads
    split = 1 << 40
    want = nthreads * ITEMS_PER_THREAD
    if nthreads > 1 and total < want:
        per = max((short_ctx + want - 1) // want, MIN_SPLIT)
        split = (per + block_size - 1) // block_size * block_size

    count = 0
    nmerge = 0
    for i in range(num_seqs):
        n = query_start_loc[i + 1] - query_start_loc[i]
        if n <= 0:
            continue
        if n * num_heads <= ALL_HEADS_ROWS:
            parts = (context_lens[i] + split - 1) // split
            count += parts
            nmerge += parts > 1
        else:
            count += (n + Q_TILE - 1) // Q_TILE * num_kv_heads

    items = np.empty((count, _NCOL), np.int64)
    merges = np.empty((nmerge, 4), np.int64)
    cost = np.empty(count, np.float64)
    k = 0
    mk = 0
    npart = 0
    for i in range(num_seqs):
        n = query_start_loc[i + 1] - query_start_loc[i]
        if n <= 0:
            continue
        ctx = context_lens[i]
        if n * num_heads <= ALL_HEADS_ROWS:
            parts = (ctx + split - 1) // split
            if parts > 1:
                merges[mk, 0] = i
                merges[mk, 1] = n * num_heads
                merges[mk, 2] = npart
                merges[mk, 3] = parts
                mk += 1
            for p in range(parts):
                items[k, _SEQ] = i
                items[k, _H0] = 0
                items[k, _NH] = num_kv_heads
                items[k, _J0] = 0
                items[k, _NQ] = n
                items[k, _LO] = p * split
                items[k, _HI] = min(ctx, (p + 1) * split)
                items[k, _PART] = -1
                if parts > 1:
                    items[k, _PART] = npart
                    npart += 1
                # Decode is memory bound: the cost is the rows read (+ a fixed overhead).
                cost[k] = (items[k, _HI] - items[k, _LO]) * num_kv_heads * (1.0 + 0.1 * n * group) + 64.0
                k += 1
        else:
            for h in range(num_kv_heads):
                for j0 in range(0, n, Q_TILE):
                    nq = min(Q_TILE, n - j0)
                    items[k, _SEQ] = i
                    items[k, _H0] = h
                    items[k, _NH] = 1
                    items[k, _J0] = j0
                    items[k, _NQ] = nq
                    items[k, _LO] = 0
                    items[k, _HI] = ctx - n + j0 + nq  # causal: the tile's last position + 1
                    items[k, _PART] = -1
                    cost[k] = (items[k, _HI] - nq * 0.5) * (1.0 + 0.1 * nq * group) + 64.0
                    k += 1

    # Longest first onto the least-loaded thread.
    by_cost = _argsort_desc(cost)
    load = np.zeros(nthreads, np.float64)
    owner = np.empty(count, np.int64)
    for idx in by_cost:
        t = 0
        for u in range(1, nthreads):
            if load[u] < load[t]:
                t = u
        owner[idx] = t
        load[t] += cost[idx]
    bounds = np.zeros(nthreads + 1, np.int64)
    for idx in range(count):
        bounds[owner[idx] + 1] += 1
    for t in range(nthreads):
        bounds[t + 1] += bounds[t]
    fill = np.empty(nthreads, np.int64)
    for t in range(nthreads):
        fill[t] = bounds[t]
    order = np.empty(count, np.int64)
    for idx in by_cost:
        order[fill[owner[idx]]] = idx
        fill[owner[idx]] += 1
    return items, order, bounds, merges, npart
