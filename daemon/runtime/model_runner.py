"""Flattening a scheduled step into tensors and running the model over the paged cache.

The caller (the scheduler, or the offline loop) has already asked the block manager for slots;
a step arrives here as one `SeqChunk` per sequence: the tokens to compute, where they sit, where
their K/V go, and whether the last one is sampled. Out come logits for the sampled rows only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import psutil
import torch

from ..engine.sequence import SeqChunk
from ..models.llama import LlamaModel
from ..models.reference_cache import ContiguousKVCache
from .omp_spin import SpinGovernor
from .paged_cache import PagedKVCache, PagedStep, peak_rss, reset_peak_rss

log = logging.getLogger(__name__)

# What a failed step says when the device itself is gone: a CUDA error poisons the context for
# every later call, so the daemon must exit and let systemd restart it. Anything else fails only
# the step's requests (Engine `is_fatal`).
_DEVICE_ERROR_TYPES = frozenset({"AcceleratorError", "CudaAPIError", "CudaDriverError", "CudaSupportError"})
_DEVICE_ERROR_TEXT = ("CUDA error", "CUDA driver", "CUDA_ERROR", "CUBLAS_STATUS", "cuDNN error",
                      "illegal memory access", "device-side assert", "NCCL error")


def is_device_error(exc: BaseException) -> bool:
    """Whether a step's exception means the device (not the request) is broken."""
    if any(t.__name__ in _DEVICE_ERROR_TYPES for t in type(exc).__mro__):
        return True
    text = str(exc)
    return any(marker in text for marker in _DEVICE_ERROR_TEXT)


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: PagedKVCache) -> None:
        self.model = model
        self.kv = kv
        self.device = model.device
        # Steps whose products come from the block codes (a few tokens) spin OpenMP's workers;
        # every other step throttles them (see omp_spin). CPU only: a GPU step launches no OpenMP regions.
        self._omp = SpinGovernor() if self.device.type == "cpu" else None
        self._codes = model.weights.lm_head_q is not None
        # Decode steps of up to `cpu.qgemm_max_tokens` sequences run each layer as one Numba call
        # (LlamaModel.decode_tokens) over numpy views of the cache, made once here.
        self._caches_np: list[tuple[np.ndarray, np.ndarray]] | None = None
        if kv.dtype == torch.float32 and kv.device.type == "cpu" and model.one_token_layers():
            d = model.config.head_dim
            self._caches_np = [(k.numpy().reshape(-1, d), v.numpy().reshape(-1, d)) for k, v in zip(kv.k, kv.v)]

    def prepare(self, chunks: Sequence[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor, PagedStep, torch.Tensor]:
        """→ input_ids [T] int64, positions [T] int64, the step's attention metadata, and the row
        of each sampled sequence's last token in the flat batch ([num_sampled] int64)."""
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        starts = [0]
        ctx = []
        sample_rows = []
        width = max(len(c.block_table) for c in chunks)
        tables = torch.full((len(chunks), width), -1, dtype=torch.int32)
        for i, c in enumerate(chunks):
            n = len(c.token_ids)
            if len(c.slots) != n:
                raise ValueError(f"sequence chunk {i}: {n} tokens but {len(c.slots)} slots")
            ids.extend(c.token_ids)
            pos.extend(range(c.start_pos, c.start_pos + n))
            slots.extend(c.slots)
            starts.append(starts[-1] + n)
            ctx.append(c.start_pos + n)
            tables[i, : len(c.block_table)] = torch.tensor(c.block_table, dtype=torch.int32)
            if c.sample:
                sample_rows.append(starts[-1] - 1)
        dev = self.device
        step = PagedStep(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=tables.to(dev),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            decode_only=all(len(c.token_ids) == 1 for c in chunks),
        )
        return (
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(pos, dtype=torch.int64, device=dev),
            step,
            torch.tensor(sample_rows, dtype=torch.int64, device=dev),
        )

    def release(self, seq_id: int) -> None:
        """Nothing to do: the block manager owns the paged cache's memory."""

    def execute(self, chunks: Sequence[SeqChunk], copies: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
        """Run one step → logits [num_sampled, vocab] float32, in the order of the sampled chunks.
        `copies`: copy-on-write block copies (src, dst) to perform before any cache write."""
        if copies:
            self.kv.copy_blocks([s for s, _ in copies], [d for _, d in copies])
        codes = self._codes and self.model.cpu.uses_codes(sum(len(c.token_ids) for c in chunks))
        if self._omp is not None:
            if codes:
                self._omp.spin()
            else:
                self._omp.throttle()
        input_ids, positions, step, rows = self.prepare(chunks)
        kv = self.kv
        if codes and self._caches_np is not None and step.decode_only:
            hidden = self.model.decode_tokens(
                input_ids, positions, self._caches_np, step.slot_mapping.numpy(), step.block_tables.numpy(),
                step.context_lens.numpy(), step.query_start_loc.numpy(), kv.block_size)
        else:
            hidden = self.model.forward(input_ids, positions, lambda layer, q, k, v: kv.attend(step, layer, q, k, v))
        return self.model.logits(hidden[rows])


# Tokens of the CPU profiling forward. Activations grow linearly with the tokens of a step
# (attention runs in the kernels, no [T, T] scores), so a short forward scaled up bounds a
# long one, at a fraction of the time: a 2048-token forward takes seconds on a small CPU.
_CPU_PROFILE_TOKENS = 256


def measure_activation_peak(model: LlamaModel, num_tokens: int, block_size: int) -> int:
    """Bytes a forward of `num_tokens` prompt tokens needs beyond weights and cache, measured by
    running one: the peak CUDA allocation on a GPU; on Linux CPUs the RSS high-water mark (reset
    first) of a shorter forward, scaled up. Elsewhere an estimate from the shapes."""
    cfg = model.config
    scale = 1.0
    if model.device.type != "cuda" and num_tokens > _CPU_PROFILE_TOKENS:
        scale, num_tokens = num_tokens / _CPU_PROFILE_TOKENS, _CPU_PROFILE_TOKENS
    blocks = -(-num_tokens // block_size)
    kv = PagedKVCache(cfg, blocks, block_size, model.dtype, model.device)
    runner = ModelRunner(model, kv)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (num_tokens,), generator=g).tolist()
    chunk = SeqChunk(0, tokens, 0, list(range(num_tokens)), list(range(blocks)), True)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.execute([chunk])
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    # kv's pages are untouched until written: touch them first so the peak below excludes them
    for t in kv.k + kv.v:
        t.zero_()
    rss = psutil.Process().memory_info().rss
    if reset_peak_rss():
        runner.execute([chunk])
        return int(max(peak_rss() - rss, 0) * scale)
    elem = torch.empty((), dtype=model.dtype).element_size()
    per_token = (4 * cfg.hidden_size + 3 * cfg.intermediate_size + cfg.q_size + 2 * cfg.kv_size) * elem
    return int((num_tokens * per_token + cfg.vocab_size * 4) * scale)


class ReferenceRunner:
    """The oracle the paged path is checked against: per-sequence contiguous K/V and torch SDPA
    (`ContiguousKVCache`), ignoring slots and block tables. Same `execute` contract as
    `ModelRunner`; a chunk starting before a sequence's cached length (a recompute after
    preemption) overwrites from there."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self.cache = ContiguousKVCache(model.config, model.dtype, model.device)

    def execute(self, chunks: Sequence[SeqChunk], copies: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
        dev = self.model.device
        for c in chunks:
            self.cache.ensure(c.seq_id, c.start_pos, c.start_pos + len(c.token_ids))
        step = self.cache.plan([c.seq_id for c in chunks], [len(c.token_ids) for c in chunks])
        ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.int64, device=dev)
        pos = torch.cat([torch.arange(c.start_pos, c.start_pos + len(c.token_ids)) for c in chunks]).to(dev)
        cache = self.cache
        hidden = self.model.forward(ids, pos, lambda layer, q, k, v: cache.attend(step, layer, q, k, v))
        rows = [step.query_start[i + 1] - 1 for i, c in enumerate(chunks) if c.sample]
        return self.model.logits(hidden[torch.tensor(rows, dtype=torch.int64, device=dev)])

    def release(self, seq_id: int) -> None:
        self.cache.free(seq_id)
