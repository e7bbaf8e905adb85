"""CPU kernels that write the paged KV cache: a step's new K/V into their slots, and whole-block
copies for copy-on-write. Bit copies (float32, or bfloat16 as int16 bits), serial: a step
writes at most a few MB, and waking the thread pool costs more than the copy."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _write_kv(key, value, k, v, slot_mapping, num_kv_heads):
    """key, value: [num_tokens * num_kv_heads, head_dim]; k, v: [num_slots * num_kv_heads,
    head_dim]; a bit copy, so it serves float32 and bfloat16 (int16) alike. Serial: a step writes
    at most a few MB, and waking the pool costs more than the copy for decode batches.
    Returns the index of the first token whose slot is out of range (nothing written), or -1."""
    num_slots = k.shape[0] // num_kv_heads
    for t in range(slot_mapping.shape[0]):
        if slot_mapping[t] >= num_slots:
            return t
    for t in range(slot_mapping.shape[0]):
        slot = slot_mapping[t]
        if slot < 0:
            continue
        # Explicit loops: slice assignment pulls in Numba's broadcasting and error-message
        # machinery, seconds of compile time for a plain copy.
        for h in range(num_kv_heads):
            for d in range(k.shape[1]):
                k[slot * num_kv_heads + h, d] = key[t * num_kv_heads + h, d]
                v[slot * num_kv_heads + h, d] = value[t * num_kv_heads + h, d]
    return -1


def write_kv_cache(key: np.ndarray, value: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                   slot_mapping: np.ndarray) -> None:
    """key/value [num_tokens, num_kv_heads, head_dim] into caches [num_blocks, block_size,
    num_kv_heads, head_dim] at slot_mapping [num_tokens] (-1 = skip)."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    bad = _write_kv(key.reshape(-1, head_dim), value.reshape(-1, head_dim),
                    k_cache.reshape(-1, head_dim), v_cache.reshape(-1, head_dim), slot_mapping,
                    num_kv_heads)
    if bad >= 0:
        raise ValueError(f"slot_mapping[{bad}] = {int(slot_mapping[bad])} is outside the cache's "
                         f"{k_cache.shape[0] * k_cache.shape[1]} slots")


@njit(cache=True)
def _copy_blocks(k, v, src, dst):
    """k, v: [num_blocks, block_size * num_kv_heads * head_dim]; src, dst: [n] int64.
    Returns the first i with a block id out of range (nothing copied), or -1."""
    for i in range(src.shape[0]):
        if src[i] < 0 or src[i] >= k.shape[0] or dst[i] < 0 or dst[i] >= k.shape[0]:
            return i
    for i in range(src.shape[0]):
        for x in range(k.shape[1]):
            k[dst[i], x] = k[src[i], x]
            v[dst[i], x] = v[src[i], x]
    return -1


def copy_blocks(k_cache: np.ndarray, v_cache: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
    """Copy whole blocks src[i] -> dst[i] in both caches (copy-on-write of a shared block)."""
    nb = k_cache.shape[0]
    bad = _copy_blocks(k_cache.reshape(nb, -1), v_cache.reshape(nb, -1), src, dst)
    if bad >= 0:
        raise ValueError(f"src[{bad}] = {int(src[bad])} or dst[{bad}] = {int(dst[bad])} is not a "
                         f"block id in 0..{nb - 1}")
