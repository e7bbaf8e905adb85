"""The paged KV cache's tensors and the attention that reads them.

Per layer, `k_cache` and `v_cache` of shape [num_blocks, block_size, num_kv_heads, head_dim];
which blocks a sequence owns is the block manager's business (inflightd.engine.block_manager, pure Python).
A step's attention metadata is an explicit, frozen `PagedStep` handed to `attend`; nothing is
global. New K/V are written through `numba_kernels.write_kv_cache` first, so attention always
reads the whole context, prefix-cache hits and earlier chunks included, from the cache.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import psutil
import torch

import numba_kernels

from ..models.config import ModelConfig

log = logging.getLogger(__name__)

# Share of the memory still available after weights and the activation peak that `memory: auto`
# gives the cache. The CPU share leaves room for the page cache and other processes; the GPU
# share follows vLLM's gpu_memory_utilization default.
AUTO_SHARE = {"cpu": 0.5, "cuda": 0.9}


@dataclass(frozen=True)
class PagedStep:
    """Attention metadata of one forward step over the paged cache."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V goes (-1 = skip)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor  # [num_seqs] int32, the new tokens included
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    decode_only: bool  # every sequence brings exactly one token: the decode kernel applies


class PagedKVCache:
    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str,
        serial_work: int | None = None,
    ) -> None:
        """`serial_work`: CPU attention over more context positions splits over the thread pool
        (`CpuSettings.serial_work`; the kernels' default when None)."""
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.serial_work = serial_work
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        # torch.empty: pages are only committed as blocks get written, so a large `auto` cache
        # costs address space, not resident memory, until it fills.
        self.k = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(config.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(config.num_layers)]

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem

    def attend(self, step: PagedStep, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D] → [T, H, D]
        kc, vc = self.k[layer], self.v[layer]
        # v is a column slice of the fused qkv projection; the kernels take contiguous rows
        numba_kernels.write_kv_cache(k.contiguous(), v.contiguous(), kc, vc, step.slot_mapping)
        out = torch.empty_like(q)
        scale = self.config.attn_scale
        if step.decode_only:
            numba_kernels.paged_attention_decode(out, q, kc, vc, step.block_tables, step.context_lens, scale,
                                                 serial_work=self.serial_work)
        else:
            numba_kernels.paged_attention_prefill(
                out, q, kc, vc, step.block_tables, step.context_lens, step.query_start_loc, scale,
                serial_work=self.serial_work,
            )
        return out

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy-on-write: duplicate whole blocks in every layer before a step writes into them."""
        if not src:
            return
        s = torch.tensor(src, dtype=torch.int64, device=self.device)
        d = torch.tensor(dst, dtype=torch.int64, device=self.device)
        for kc, vc in zip(self.k, self.v):
            numba_kernels.copy_blocks(kc, vc, s, d)


def available_memory(device: torch.device) -> int:
    """Bytes this process could still take: free device memory on a GPU, MemAvailable on a CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux ≥ 4.0), so that a
    profiling forward's peak can be read from VmHWM. False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return psutil.Process(os.getpid()).memory_info().rss


def plan_num_blocks(
    config: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    memory: int | float | str,
    activation_peak: int,
) -> int:
    """Blocks for `kv_cache.memory`: a byte count (int), a share in (0, 1] (float) of the memory
    available now — weights already loaded — less the measured activation peak, or "auto" = the
    device's default share (AUTO_SHARE)."""
    per_block = PagedKVCache.bytes_per_block(config, block_size, dtype)
    if memory == "auto":
        avail = available_memory(device) - activation_peak
        budget = int(max(avail, 0) * AUTO_SHARE.get(device.type, 0.5))
        how = f"auto: {AUTO_SHARE.get(device.type, 0.5):.0%} of {avail / 2**30:.2f} GiB available after activations"
    elif isinstance(memory, float) and 0 < memory <= 1:
        avail = available_memory(device) - activation_peak
        budget = int(max(avail, 0) * memory)
        how = f"{memory:.0%} of {avail / 2**30:.2f} GiB available after activations"
    elif isinstance(memory, int) and not isinstance(memory, bool) and memory > 0:
        budget, how = memory, "configured"
    else:
        raise ValueError(f"kv_cache.memory must be a positive number of bytes or 'auto', got {memory!r}")
    blocks = budget // per_block
    if blocks < 1:
        raise ValueError(
            f"kv_cache.memory ({how}) = {budget} bytes holds no {block_size}-token block "
            f"({per_block} bytes each): give the cache more memory"
        )
    log.info(
        "KV cache: %d blocks × %d tokens = %d tokens (%.2f GiB, %s, %s)",
        blocks,
        block_size,
        blocks * block_size,
        blocks * per_block / 2**30,
        str(dtype).removeprefix("torch."),
        how,
    )
    return int(blocks)
