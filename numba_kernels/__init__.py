"""Attention and KV-cache kernels over the paged cache, each with a numba.cuda and a CPU
implementation behind one dispatching function (the kernel contract: ARCHITECTURE.md).

The functions here validate their arguments (ValueError naming the argument) and route by
device: CPU tensors go to ``numba_kernels.cpu`` (``njit(parallel=True)``), CUDA tensors to
``numba_kernels.cuda``, imported only when a CUDA tensor first arrives so that a CPU-only
install never imports numba.cuda.

Threading: Numba's ``omp`` layer is chosen here, at import (``workqueue`` if this Numba has no
OpenMP pool; a user's ``NUMBA_THREADING_LAYER`` wins): an empty ``prange`` costs ~4 µs to
launch with ``omp`` against ~50-100 µs with ``workqueue`` on a 2-core machine, and a decode step
launches one kernel per layer. OpenMP's wait policy and spin count are the caller's to set
before torch loads libgomp (inflightd does, in ``inflightd.runtime.settings``, for the reasons
given there): with two OpenMP runtimes sharing the cores (torch's and Numba's), default
spinning stalls alternating torch ops and kernels for whole scheduler slices, and a bare
passive policy pays a ~60-110 µs wake-up per parallel region.

This package imports nothing from `inflightd`.
"""
from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Iterable
from typing import Any

import numba
import numpy as np
import torch

if "NUMBA_THREADING_LAYER" not in os.environ:
    try:
        from numba.np.ufunc import omppool  # type: ignore[attr-defined]  # noqa: F401  (OpenMP pool available?)

        numba.config.THREADING_LAYER = "omp"
    except ImportError:
        numba.config.THREADING_LAYER = "workqueue"

__all__ = ["write_kv_cache", "paged_attention_decode", "paged_attention_prefill", "copy_blocks",
           "warmup"]

_CPU_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda() -> Any:
    from . import cuda  # lazy: numba.cuda is heavy and needs the CUDA runtime

    return cuda


def _np(t: torch.Tensor) -> Any:
    """A numpy view (no copy); bfloat16 has no numpy dtype, so its bits are viewed as int16."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


_CACHES: dict[tuple[int, int], tuple[Any, Any, int, int]] = {}


def _unowned_np(t: torch.Tensor) -> Any:
    """A numpy view of t's memory that does not keep t alive (_caches drops it when t dies)."""
    dtype = np.int16 if t.dtype == torch.bfloat16 else t.numpy().dtype
    buf = (ctypes.c_byte * (t.numel() * t.element_size())).from_address(t.data_ptr())
    return np.frombuffer(memoryview(buf), dtype).reshape(tuple(t.shape))


def _caches(k_cache: Any, v_cache: Any) -> tuple[Any, Any]:
    """Validate the KV caches; return their numpy views (None on CUDA).

    Every layer of every step passes the same cache tensors (two per layer), and validating
    them plus two tensor -> numpy conversions cost ~4 µs a call, a measurable share of a small
    decode step (benchmarks/attention.py), so a validated pair is remembered until either
    tensor is freed. The views do not own the memory (a view that did would keep the tensors,
    often GBs, alive for as long as the table holds it); a finalizer removes the entry when
    either tensor dies, before its id or address can be reused."""
    key = (id(k_cache), id(v_cache))
    hit = _CACHES.get(key)
    if hit is not None and k_cache.data_ptr() == hit[2] and v_cache.data_ptr() == hit[3]:
        return hit[0], hit[1]
    _check_caches(k_cache, v_cache)
    if k_cache.is_cuda:
        views: tuple[Any, Any] = (None, None)
    else:
        views = (_unowned_np(k_cache), _unowned_np(v_cache))
    _CACHES[key] = (views[0], views[1], k_cache.data_ptr(), v_cache.data_ptr())
    weakref.finalize(k_cache, _CACHES.pop, key, None)
    weakref.finalize(v_cache, _CACHES.pop, key, None)
    return views


def _tensor(name: str, t: Any, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, "
                         f"strides {t.stride()})")
    return t


def _index(name: str, t: Any, ndim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    _tensor(name, t, ndim)
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, but the cache is on {device}")
    return t


def _check_caches(k_cache: Any, v_cache: Any) -> None:
    _tensor("k_cache", k_cache, 4)
    _tensor("v_cache", v_cache, 4)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape "
                         f"{tuple(k_cache.shape)}")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache dtype {v_cache.dtype} != k_cache dtype {k_cache.dtype}")
    if v_cache.device != k_cache.device:
        raise ValueError(f"v_cache is on {v_cache.device}, k_cache on {k_cache.device}")
    allowed = _CUDA_DTYPES if k_cache.is_cuda else _CPU_DTYPES
    if k_cache.dtype not in allowed:
        raise ValueError(f"k_cache dtype {k_cache.dtype} is not supported on "
                         f"{k_cache.device.type} (use one of {', '.join(map(str, allowed))})")
    if not (k_cache.is_cuda or k_cache.device.type == "cpu"):
        raise ValueError(f"k_cache is on {k_cache.device}: only cpu and cuda are supported")


def _like_cache(name: str, t: Any, k_cache: torch.Tensor, ndim: int) -> torch.Tensor:
    _tensor(name, t, ndim)
    if t.dtype != k_cache.dtype:
        raise ValueError(f"{name} must have the cache dtype {k_cache.dtype}, got {t.dtype}")
    if t.device != k_cache.device:
        raise ValueError(f"{name} is on {t.device}, but the cache is on {k_cache.device}")
    return t


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into the caches [num_blocks,
    block_size, num_kv_heads, head_dim] at slot_mapping [num_tokens] int64 (slot =
    block * block_size + offset; -1 = skip, e.g. padding)."""
    kc, vc = _caches(k_cache, v_cache)
    _like_cache("key", key, k_cache, 3)
    _like_cache("value", value, k_cache, 3)
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"key shape {tuple(key.shape)} does not match the cache's "
                         f"[num_kv_heads, head_dim] = {tuple(k_cache.shape[2:])}")
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} != key shape {tuple(key.shape)}")
    _index("slot_mapping", slot_mapping, 1, torch.int64, k_cache.device)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for "
                         f"{key.shape[0]} tokens")
    if k_cache.is_cuda:
        _cuda().write_kv_cache(key, value, k_cache, v_cache, slot_mapping)
        return
    from . import cpu_cache

    cpu_cache.write_kv_cache(_np(key), _np(value), kc, vc, slot_mapping.numpy())


def _attention_args(out: Any, query: Any, k_cache: Any, v_cache: Any, block_tables: Any,
                    context_lens: Any) -> tuple[Any, Any]:
    views = _caches(k_cache, v_cache)
    _like_cache("query", query, k_cache, 3)
    _like_cache("out", out, k_cache, 3)
    qshape = query.shape
    if out.shape != qshape:
        raise ValueError(f"out shape {tuple(out.shape)} != query shape {tuple(qshape)}")
    _, num_heads, head_dim = qshape
    _, _, num_kv_heads, cache_dim = k_cache.shape
    if head_dim != cache_dim:
        raise ValueError(f"query head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    if num_heads % num_kv_heads:
        raise ValueError(f"query num_heads {num_heads} is not a multiple of the cache's "
                         f"num_kv_heads {num_kv_heads}")
    dev = k_cache.device
    _index("block_tables", block_tables, 2, torch.int32, dev)
    _index("context_lens", context_lens, 1, torch.int32, dev)
    if context_lens.shape[0] != block_tables.shape[0]:
        raise ValueError(f"context_lens has {context_lens.shape[0]} entries, block_tables "
                         f"{block_tables.shape[0]} rows")
    return views


def paged_attention_decode(out: torch.Tensor, query: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, *, serial_work: int | None = None) -> None:
    """out[i] = attention of query[i] ([num_heads, head_dim], one new token per sequence) over
    the first context_lens[i] cached positions of sequence i (its own K/V already written).
    `serial_work` (CPU): context positions above which the work splits over the thread pool
    (default `cpu.SERIAL_WORK`)."""
    kc, vc = _attention_args(out, query, k_cache, v_cache, block_tables, context_lens)
    if query.shape[0] != context_lens.shape[0]:
        raise ValueError(f"query has {query.shape[0]} tokens for {context_lens.shape[0]} "
                         f"sequences (decode takes exactly one per sequence)")
    if k_cache.is_cuda:
        _cuda().paged_attention_decode(out, query, k_cache, v_cache, block_tables, context_lens,
                                       scale)
        return
    from . import cpu

    cpu.attention(_np(out), _np(query), kc, vc, block_tables.numpy(),
                  context_lens.numpy(), _arange(context_lens.shape[0] + 1), scale,
                  serial_work=cpu.SERIAL_WORK if serial_work is None else serial_work)


_ARANGE: dict[int, np.ndarray] = {}


def _arange(n: int) -> np.ndarray:
    """query_start_loc of a decode batch (0, 1, ..., n - 1), cached: it is the same every step."""
    t = _ARANGE.get(n)
    if t is None:
        t = _ARANGE[n] = np.arange(n, dtype=np.int32)
    return t


def paged_attention_prefill(out: torch.Tensor, query: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, block_tables: torch.Tensor,
                            context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            scale: float, *, serial_work: int | None = None) -> None:
    """Causal attention for a chunk of new tokens per sequence.

    query/out [num_tokens, num_heads, head_dim]; tokens query_start_loc[i]:query_start_loc[i+1]
    are the last n_i tokens of sequence i, whose context (including them, already in the cache)
    is context_lens[i]: token j of the chunk sits at position context_lens[i] - n_i + j and
    attends to cache positions 0..that position. Serves whole prompts, chunked prefill and
    prefix reuse; n_i may be 0 (nothing written for it), and n_i == 1 is a decode step.
    `serial_work` as for `paged_attention_decode`."""
    kc, vc = _attention_args(out, query, k_cache, v_cache, block_tables, context_lens)
    _index("query_start_loc", query_start_loc, 1, torch.int32, k_cache.device)
    if query_start_loc.shape[0] != context_lens.shape[0] + 1:
        raise ValueError(f"query_start_loc has {query_start_loc.shape[0]} entries for "
                         f"{context_lens.shape[0]} sequences (needs num_seqs + 1)")
    if k_cache.is_cuda:
        _cuda().paged_attention_prefill(out, query, k_cache, v_cache, block_tables, context_lens,
                                        query_start_loc, scale)
        return
    from . import cpu

    cpu.attention(_np(out), _np(query), kc, vc, block_tables.numpy(),
                  context_lens.numpy(), query_start_loc.numpy(), scale,
                  serial_work=cpu.SERIAL_WORK if serial_work is None else serial_work)


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor,
                dst: torch.Tensor) -> None:
    """Copy whole blocks src[i] -> dst[i] (int64 [n]) in both caches: copy-on-write of a block
    that several sequences share."""
    kc, vc = _caches(k_cache, v_cache)
    _index("src", src, 1, torch.int64, k_cache.device)
    _index("dst", dst, 1, torch.int64, k_cache.device)
    if src.shape != dst.shape:
        raise ValueError(f"src has {src.shape[0]} entries, dst {dst.shape[0]}")
    if k_cache.is_cuda:
        _cuda().copy_blocks(k_cache, v_cache, src, dst)
        return
    from . import cpu_cache

    cpu_cache.copy_blocks(kc, vc, src.numpy(), dst.numpy())


def warmup(dtypes: Iterable[torch.dtype] = (torch.float32,), device: str = "cpu") -> None:
    """Compile (or load from Numba's cache) every kernel for the given dtypes, so that no
    request pays for JIT compilation: call before the daemon reports READY."""
    if torch.device(device).type == "cuda":
        _cuda().warmup(dtypes=tuple(dtypes))
        return
    from . import cpu, cpu_ops, cpu_qmatmul

    for dtype in dtypes:
        if dtype not in _CPU_DTYPES:
            raise ValueError(f"dtype {dtype} is not supported on cpu")
        cpu.warmup(dtype)
    cpu_ops.warmup()
    cpu_qmatmul.warmup()
