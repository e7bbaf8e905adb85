"""numba.cuda implementations of the kernel entry points (the kernel contract: ARCHITECTURE.md):
torch CUDA tensors in, launched on torch's current stream. The kernels themselves and the design
notes (v1/v2 partitions, shared-memory layout, bf16 as int16 bits) are in `cuda_kernels`.

Under the CUDA simulator (`NUMBA_ENABLE_CUDASIM=1`) the same functions accept CPU tensors or numpy
arrays, which is how the tests run them without a GPU; `LaunchConfig` then shrinks the thread
blocks and partitions to sizes the simulator (one Python thread per CUDA thread) can afford.

Each kernel gets one dispatcher per element dtype, built with its explicit signature (eager
compilation, and no surprise re-specialization on a stride or dtype change at serving time).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numba import cuda

from . import cuda_kernels as K

__all__ = ["LaunchConfig", "write_kv_cache", "paged_attention_decode", "paged_attention_prefill",
           "copy_blocks", "warmup", "DEFAULT_CONFIG"]


@dataclass(frozen=True)
class LaunchConfig:
    """Block geometry. `threads` must be a power of two (tree reductions); `tile * head_dim`
    must be a multiple of 4 * threads (the K staging loop loads four elements per thread per
    step); `partition` is the context length one thread block covers (vLLM v2 uses 512)."""
    threads: int = 128
    partition: int = 512
    tile: int = 32

    def shared_bytes(self, group: int, head_dim: int) -> int:
        floats = group * head_dim + group * (self.partition + K.PAD) + self.tile * (head_dim + 1) \
            + group * self.threads
        return 4 * floats


# 128 threads = 4 warps covers head_dim 128 in the P@V phase with one column per thread;
# 512-position partitions keep the probability rows in 48 KiB of shared memory at GQA 8
# (8 * 516 * 4 + q + K tile + reduction = 41 KiB) and give a 4k context 8 blocks per (seq, kv head).
DEFAULT_CONFIG = LaunchConfig()

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_dispatchers: dict[tuple[str, str], Any] = {}
_streams: dict[int, Any] = {}


def _dispatcher(kernel: str, dtype: str) -> Any:
    """The compiled kernel for one dtype (compiled on first use, or by `warmup`)."""
    key = (kernel, dtype)
    disp = _dispatchers.get(key)
    if disp is None:
        # cache=True: numba's on-disk cache makes a restart skip NVVM (seconds per kernel).
        disp = cuda.jit([K.signature(kernel, dtype)], cache=not K.SIMULATOR)(K.KERNELS[kernel])
        _dispatchers[key] = disp
    return disp


def _dtype_name(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        name = _DTYPE_NAMES.get(t.dtype)
    else:  # numpy (simulator); bf16 arrives as int16 bits
        name = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32",
                np.dtype(np.int16): "bfloat16"}.get(np.asarray(t).dtype)
    if name is None:
        raise TypeError(f"unsupported dtype {t.dtype} (float16, bfloat16, float32)")
    return name


def _on_gpu(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_cuda


def _arr(t: Any) -> Any:
    """A kernel argument: a numba device array view of a CUDA tensor (no copy, no sync), or for
    the simulator a numpy view of a CPU tensor. bf16 is reinterpreted as int16 bits."""
    if isinstance(t, torch.Tensor):
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        if t.is_cuda:
            # sync=False: torch's interface names no stream; ordering comes from launching on
            # torch's current stream.
            return cuda.as_cuda_array(t, sync=False)
        if not K.SIMULATOR:
            raise ValueError("numba_kernels.cuda got a CPU tensor (use the CPU kernels)")
        return t.numpy()
    return t


def _stream() -> Any:
    """Numba's handle on torch's current stream, cached per raw stream pointer."""
    handle = torch.cuda.current_stream().cuda_stream
    s = _streams.get(handle)
    if s is None:
        s = cuda.external_stream(handle)
        _streams[handle] = s
    return s


def _launch(kernel: str, dtype: str, grid: tuple[int, ...], threads: int, shared: int,
            gpu: bool, *args: Any) -> None:
    disp = _dispatcher(kernel, dtype)
    if gpu:
        disp[grid, threads, _stream(), shared](*args)
    else:
        disp[grid, threads, 0, shared](*args)


def _empty(shape: tuple[int, ...], like: Any) -> Any:
    if _on_gpu(like):
        return torch.empty(shape, dtype=torch.float32, device=like.device)
    return np.empty(shape, dtype=np.float32)


def _need(t: Any, what: str, dtype: Any = None, contiguous: bool = True) -> None:
    """Fail loudly on a wrong dtype or layout: a kernel with one explicit signature is launched
    without numba's type resolution, so a mismatch would be read as garbage, not rejected."""
    if dtype is not None and t.dtype != dtype and str(t.dtype).replace("torch.", "") != str(np.dtype(dtype)):
        raise TypeError(f"{what}: dtype {t.dtype}, expected {np.dtype(dtype)}")
    if contiguous and not (t.is_contiguous() if isinstance(t, torch.Tensor) else t.flags.c_contiguous):
        raise ValueError(f"{what} must be contiguous")


def _check(query: Any, k_cache: Any, cfg: LaunchConfig) -> tuple[int, int]:
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads or not 1 <= num_heads // num_kv_heads <= K.MAX_GROUP:
        raise ValueError(f"num_heads {num_heads} / num_kv_heads {num_kv_heads}: GQA ratio 1..{K.MAX_GROUP}")
    if cfg.threads & (cfg.threads - 1) or (cfg.tile * head_dim) % (4 * cfg.threads):
        raise ValueError(f"launch config {cfg} does not fit head_dim {head_dim}")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"cache head_dim {k_cache.shape[3]} != query head_dim {head_dim}")
    return num_heads // num_kv_heads, head_dim


def _attention(out: Any, query: Any, k_cache: Any, v_cache: Any, block_tables: Any,
               context_lens: Any, query_start_loc: Any, scale: float, decode: bool,
               max_context_len: int | None, cfg: LaunchConfig) -> None:
    group, head_dim = _check(query, k_cache, cfg)
    for t, what in ((out, "out"), (k_cache, "k_cache"), (v_cache, "v_cache")):
        _need(t, what, contiguous=what != "out")
        if t.dtype != query.dtype:
            raise TypeError(f"{what} dtype {t.dtype} != query dtype {query.dtype}")
    for t, what in ((block_tables, "block_tables"), (context_lens, "context_lens"),
                    (query_start_loc, "query_start_loc")):
        _need(t, what, np.int32)
    num_tokens, num_heads = query.shape[0], query.shape[1]
    if num_tokens == 0:
        return
    # The number of partitions must be known on the host without reading context_lens (that
    # would sync the GPU): the block table's width bounds every context. Partitions past a
    # sequence's end return at once.
    bound = max_context_len if max_context_len is not None else block_tables.shape[1] * k_cache.shape[1]
    nparts = max(1, math.ceil(bound / cfg.partition))
    dtype = _dtype_name(query)
    gpu = _on_gpu(query)
    shared = cfg.shared_bytes(group, head_dim)
    o, q, kc, vc = _arr(out), _arr(query), _arr(k_cache), _arr(v_cache)
    bt, cl, qsl = _arr(block_tables), _arr(context_lens), _arr(query_start_loc)
    grid = (num_tokens, k_cache.shape[2], nparts)
    if nparts == 1:  # v1: one block per (token, kv head) writes the result
        dummy4, dummy3 = _empty((1, 1, 1, 1), query), _empty((1, 1, 1), query)
        _launch("attention", dtype, grid, cfg.threads, shared, gpu, o, _arr(dummy4), _arr(dummy3),
                _arr(dummy3), q, kc, vc, bt, cl, qsl, np.float32(scale), np.int32(decode),
                np.int32(cfg.partition), np.int32(cfg.tile), np.int32(0))
        return
    # v2: partials per partition, then a combine launch on the same stream.
    p_out = _empty((num_tokens, num_heads, nparts, head_dim), query)
    p_max = _empty((num_tokens, num_heads, nparts), query)
    p_sum = _empty((num_tokens, num_heads, nparts), query)
    pa, pm, ps = _arr(p_out), _arr(p_max), _arr(p_sum)
    _launch("attention", dtype, grid, cfg.threads, shared, gpu, o, pa, pm, ps, q, kc, vc, bt, cl,
            qsl, np.float32(scale), np.int32(decode), np.int32(cfg.partition), np.int32(cfg.tile),
            np.int32(1))
    _launch("combine", dtype, (num_tokens, num_heads), cfg.threads, 0, gpu, o, pa, pm, ps, cl, qsl,
            np.int32(decode), np.int32(cfg.partition))


def paged_attention_decode(out: torch.Tensor, query: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, *,
                           max_context_len: int | None = None,
                           config: LaunchConfig = DEFAULT_CONFIG) -> None:
    """out[i] = softmax(scale * q_i K_i^T) V_i over the first context_lens[i] cached positions of
    sequence i. query/out [num_seqs, num_heads, head_dim]. `max_context_len` (optional, a host
    int) narrows the partition grid; without it the block table's width bounds it."""
    _attention(out, query, k_cache, v_cache, block_tables, context_lens, context_lens, scale, True,
               max_context_len, config)


def paged_attention_prefill(out: torch.Tensor, query: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, block_tables: torch.Tensor,
                            context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            scale: float, *, max_context_len: int | None = None,
                            config: LaunchConfig = DEFAULT_CONFIG) -> None:
    """Tokens query_start_loc[i]:query_start_loc[i+1] are the last n_i tokens of sequence i (whose
    K/V are already in the cache); token j attends causally to positions 0..ctx_i - n_i + j.
    Each query token is its own decode-shaped work item (see cuda_kernels)."""
    _attention(out, query, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale,
               False, max_context_len, config)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                   config: LaunchConfig = DEFAULT_CONFIG) -> None:
    """k_cache[slot // bs, slot % bs] = key[t] (and v) for every t with slot_mapping[t] >= 0."""
    if key.shape[0] == 0:
        return
    for t, what in ((value, "value"), (k_cache, "k_cache"), (v_cache, "v_cache")):
        _need(t, what, contiguous=what != "value")
        if t.dtype != key.dtype:
            raise TypeError(f"{what} dtype {t.dtype} != key dtype {key.dtype}")
    _need(slot_mapping, "slot_mapping", np.int64)
    _launch("write_kv", _dtype_name(key), (key.shape[0],), config.threads, 0, _on_gpu(key),
            _arr(key), _arr(value), _arr(k_cache), _arr(v_cache), _arr(slot_mapping))


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor,
                dst: torch.Tensor, *, config: LaunchConfig = DEFAULT_CONFIG) -> None:
    """Copy whole blocks src[i] -> dst[i] in both caches (copy-on-write)."""
    if src.shape[0] == 0:
        return
    for t, what in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        _need(t, what)
    _need(src, "src", np.int64)
    _need(dst, "dst", np.int64)
    n = k_cache.shape[0]
    kc, vc = k_cache.reshape(n, -1), v_cache.reshape(n, -1)  # views: caches are contiguous
    _launch("copy_blocks", _dtype_name(k_cache), (src.shape[0],), config.threads, 0,
            _on_gpu(k_cache), _arr(kc), _arr(vc), _arr(src), _arr(dst))


def warmup(dtypes: Iterable[torch.dtype | str] = (torch.float16, torch.bfloat16, torch.float32)) -> None:
    """Compile every kernel for each dtype now (before READY=1), not on the first request."""
    for dt in dtypes:
        name = dt if isinstance(dt, str) else _DTYPE_NAMES[dt]
        for kernel in K.KERNELS:
            _dispatcher(kernel, name)
