"""One decoder layer of a llama-family model for the new token of each sequence of a decode step
of a few sequences on the CPU, as one Numba call: RMSNorm, the q/k/v product from the block codes, RoPE, the
K/V write into the paged cache, paged attention, the output product and residual, RMSNorm, the
gate/up product, SiLU-and-multiply, the down product and residual.

The same step through torch and the separate kernels makes ~25 calls per layer from Python, each
converting tensors to arrays and checking them again, around sub-µs arithmetic
(``python benchmarks/step_profile.py --batch 1``: 78-79 tok/s with this against 45-52 with
``--layer-calls``, the separate path). Here a layer is one call; the pieces are the same Numba
functions the separate path uses (``cpu_ops``, ``cpu_qmatmul``, ``cpu``), so the arithmetic is
the same except SiLU (torch's vectorised ``exp`` against libm's: equal to float32 rounding).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .cpu import _ERRORS, _LOG2E, _attention
from .cpu_cache import _write_kv
from .cpu_ops import _rms_norm, _rope
from .cpu_qmatmul import _qgemm

# Returned for a slot outside the cache (attention errors are cpu._ERRORS codes, all > 0).
_BAD_SLOT = -1
# Context positions above which attention splits over the pool (cpu.SERIAL_WORK for other
# steps): these steps run with OpenMP's workers spinning (inflightd/runtime/omp_spin.py), so a
# parallel region costs a few µs, not a wake-up. `python benchmarks/decode_context.py`
# (medians): a token at context 1000 took 10.8 ms against 13.2 with cpu.SERIAL_WORK (1024),
# at 512 9.0 against 10.2, at 128 7.2 against 7.7.
DECODE_SERIAL_WORK = 64


@njit(cache=True)
def _layer(h, attn_norm, ffn_norm, eps,
           qkv_q, qkv_d, qkv_m, qkv_has_m, qkv_bits,
           o_q, o_d, o_m, o_has_m, o_bits,
           gu_q, gu_d, gu_m, gu_has_m, gu_bits,
           dn_q, dn_d, dn_m, dn_has_m, dn_bits,
           cos, sin, num_heads, num_kv_heads, k, v, slot_mapping, block_tables, context_lens,
           query_start_loc, block_size, scale, nthreads, serial_work):
    """h [T, hidden] float32, the residual stream of T one-token sequences, updated in place.
    Returns 0 or an error."""
    tokens, hidden = h.shape
    head_dim = k.shape[1]
    x = np.empty((tokens, hidden), np.float32)
    _rms_norm(h, attn_norm, eps, x)
    qkv = np.empty((tokens, qkv_q.shape[0]), np.float32)
    _qgemm(x, qkv_q, qkv_d, qkv_m, qkv_has_m, qkv_bits, qkv, nthreads)
    _rope(qkv, cos, sin, num_heads + num_kv_heads, head_dim)
    # Rows as the cache write and attention take them: token-major, then head.
    q = np.empty((tokens * num_heads, head_dim), np.float32)
    key = np.empty((tokens * num_kv_heads, head_dim), np.float32)
    value = np.empty((tokens * num_kv_heads, head_dim), np.float32)
    base = num_heads * head_dim
    for t in range(tokens):
        for hh in range(num_heads):
            for d in range(head_dim):
                q[t * num_heads + hh, d] = qkv[t, hh * head_dim + d]
        for hh in range(num_kv_heads):
            for d in range(head_dim):
                key[t * num_kv_heads + hh, d] = qkv[t, base + hh * head_dim + d]
                value[t * num_kv_heads + hh, d] = qkv[t, base + (num_kv_heads + hh) * head_dim + d]
    if _write_kv(key, value, k, v, slot_mapping, num_kv_heads) >= 0:
        return _BAD_SLOT
    att = np.empty((tokens * num_heads, head_dim), np.float32)
    err = _attention(att, q, k, v, block_tables, context_lens, query_start_loc, num_heads,
                     num_kv_heads, block_size, scale, nthreads, serial_work)
    if err:
        return err
    o = np.empty((tokens, o_q.shape[0]), np.float32)
    _qgemm(att.reshape(tokens, -1), o_q, o_d, o_m, o_has_m, o_bits, o, nthreads)
    for t in range(tokens):
        for i in range(hidden):
            h[t, i] += o[t, i]
    _rms_norm(h, ffn_norm, eps, x)
    gu = np.empty((tokens, gu_q.shape[0]), np.float32)
    _qgemm(x, gu_q, gu_d, gu_m, gu_has_m, gu_bits, gu, nthreads)
    inter = gu.shape[1] // 2
    act = np.empty((tokens, inter), np.float32)
    one = np.float32(1.0)
    for t in range(tokens):
        for i in range(inter):
            g = gu[t, i]
            act[t, i] = g / (one + np.exp(-g)) * gu[t, inter + i]  # torch's silu: x / (1 + exp(-x))
    dn = np.empty((tokens, dn_q.shape[0]), np.float32)
    _qgemm(act, dn_q, dn_d, dn_m, dn_has_m, dn_bits, dn, nthreads)
    for t in range(tokens):
        for i in range(hidden):
            h[t, i] += dn[t, i]
    return 0


def layer(h: np.ndarray, attn_norm: np.ndarray, ffn_norm: np.ndarray, eps: float,
          weights: tuple, cos: np.ndarray, sin: np.ndarray, num_heads: int, num_kv_heads: int,
          k_cache: np.ndarray, v_cache: np.ndarray, slot_mapping: np.ndarray,
          block_tables: np.ndarray, context_lens: np.ndarray, query_start_loc: np.ndarray,
          block_size: int, scale: float, nthreads: int, serial_work: int = DECODE_SERIAL_WORK) -> None:
    """Run one layer in place on h [T, hidden] (float32, C-contiguous): the one new token of
    each of T sequences.

    weights: (q, d, m, has_m, bits) for qkv, o, gate_up and down in that order, flattened (20
    items; m is d where has_m is False; see cpu_qmatmul); cos, sin [T, rope_dim]; caches as
    [num_slots * num_kv_heads, head_dim] views; slot_mapping [T] int64; block_tables [T, width]
    int32; context_lens [T] int32 (each context including its new token); query_start_loc
    [T + 1] int32, 0..T."""
    tokens = h.shape[0]
    if not (slot_mapping.shape[0] == block_tables.shape[0] == context_lens.shape[0] == cos.shape[0] == tokens):
        raise ValueError(f"{tokens} tokens but slot_mapping {slot_mapping.shape[0]}, block_tables "
                         f"{block_tables.shape[0]}, context_lens {context_lens.shape[0]}, cos {cos.shape[0]} rows")
    err = _layer(h, attn_norm, ffn_norm, np.float32(eps), *weights, cos, sin, num_heads,
                 num_kv_heads, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                 query_start_loc, block_size, float(scale) * _LOG2E, nthreads, serial_work)
    if err == _BAD_SLOT:
        bad = [int(s) for s in slot_mapping if not -1 <= s < k_cache.shape[0] // num_kv_heads]
        raise ValueError(f"slot_mapping holds {bad[0] if bad else '?'}, outside the cache's "
                         f"{k_cache.shape[0] // num_kv_heads} slots")
    if err:
        raise ValueError(_ERRORS[err])

