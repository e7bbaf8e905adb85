"""The two KV-cache backends the offline loop (daemon/llm.py) runs on: the paged cache with the
Numba kernels (what the daemon uses) and the contiguous reference cache (the oracle that tests
compare the paged path with). Both speak `admit / run / release`, so one loop drives either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .kv_cache import BlockManager
from .model_runner import ModelRunner
from .models.llama import ContiguousKVCache, LlamaModel
from .sequence import SeqChunk


@dataclass(frozen=True)
class Work:
    seq_id: int
    token_ids: Sequence[int]  # tokens to compute this step
    start_pos: int  # position of token_ids[0]
    sample: bool  # logits wanted for the last one
    is_prompt: bool  # prompt tokens (a prefill chunk) rather than generated ones


class Backend(Protocol):
    def admit(self, seq_id: int, prompt: Sequence[int], max_new_tokens: int) -> int | None:
        """Take a sequence in: its cached prompt tokens (computed already), or None when there
        is no room for it now."""
        ...

    def run(self, work: Sequence[Work]) -> torch.Tensor:
        """One forward step → logits [num_sampled, vocab] in work order."""
        ...

    def release(self, seq_id: int) -> None: ...


class ReferenceBackend:
    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self.cache = ContiguousKVCache(model.config, model.dtype, model.device)

    def admit(self, seq_id: int, prompt: Sequence[int], max_new_tokens: int) -> int | None:
        self.cache.add_sequence(seq_id, len(prompt) + max_new_tokens)
        return 0

    def run(self, work: Sequence[Work]) -> torch.Tensor:
        dev = self.model.device
        step = self.cache.plan([w.seq_id for w in work], [len(w.token_ids) for w in work])
        ids = torch.tensor([t for w in work for t in w.token_ids], dtype=torch.int64, device=dev)
        pos = torch.cat([torch.arange(w.start_pos, w.start_pos + len(w.token_ids)) for w in work]).to(dev)
        hidden = self.model.forward(ids, pos, lambda layer, q, k, v: self.cache.attend(step, layer, q, k, v))
        rows = [step.query_start[i + 1] - 1 for i, w in enumerate(work) if w.sample]
        return self.model.logits(hidden[torch.tensor(rows, device=dev)])

    def release(self, seq_id: int) -> None:
        self.cache.free(seq_id)


class PagedBackend:
    """Admission reserves room for prompt + max_new_tokens (no eviction needed); the in-flight
    engine's scheduler replaces this with preemption and a token budget."""

    def __init__(self, runner: ModelRunner, blocks: BlockManager) -> None:
        self.runner = runner
        self.blocks = blocks
        self._promised: dict[int, int] = {}  # seq_id → blocks it may still claim

    def admit(self, seq_id: int, prompt: Sequence[int], max_new_tokens: int) -> int | None:
        bs = self.blocks.block_size
        total = -(-(len(prompt) + max_new_tokens) // bs)
        if total > self.blocks.num_blocks:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_new_tokens}) needs {total} KV blocks; "
                f"the cache has {self.blocks.num_blocks}"
            )
        if not self.blocks.can_allocate(prompt) or total > self.blocks.num_free_blocks - sum(self._promised.values()):
            return None
        cached = self.blocks.allocate(seq_id, prompt)
        self._promised[seq_id] = total - len(self.blocks.block_table(seq_id))
        return cached

    def run(self, work: Sequence[Work]) -> torch.Tensor:
        chunks = []
        bm = self.blocks
        for w in work:
            before = len(bm.block_table(w.seq_id))
            if w.is_prompt:
                slots = bm.reserve_prompt_slots(w.seq_id, len(w.token_ids))
            else:
                slots = bm.append_slots(w.seq_id, w.token_ids)
            self._promised[w.seq_id] -= len(bm.block_table(w.seq_id)) - before
            chunks.append(SeqChunk(w.seq_id, w.token_ids, w.start_pos, slots, bm.block_table(w.seq_id), w.sample))
        return self.runner.execute(chunks, bm.take_pending_copies())

    def release(self, seq_id: int) -> None:
        self.blocks.free(seq_id)
        self._promised.pop(seq_id, None)
