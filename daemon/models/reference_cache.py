"""The reference attention: per-sequence contiguous K/V buffers and torch SDPA. The oracle that
the paged cache and its kernels are checked against (`LLM(attention="reference")`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig


@dataclass(frozen=True)
class ContiguousStep:
    """Which sequences a flat batch holds: tokens query_start[i]:query_start[i+1] belong to
    seq_ids[i], whose context is context_lens[i] tokens long once this step's tokens are stored."""

    seq_ids: tuple[int, ...]
    query_start: tuple[int, ...]  # [num_seqs + 1]
    context_lens: tuple[int, ...]  # [num_seqs]


class ContiguousKVCache:
    """Reference attention over per-sequence contiguous K/V buffers (torch SDPA). Kept as the
    oracle that the paged cache and its kernels are checked against."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self._len: dict[int, int] = {}

    def add_sequence(self, seq_id: int, capacity: int) -> None:
        c = self.config
        shape = (c.num_layers, capacity, c.num_kv_heads, c.head_dim)
        self._k[seq_id] = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._v[seq_id] = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._len[seq_id] = 0

    def ensure(self, seq_id: int, start: int, end: int) -> None:
        """Make room for positions [start, end) of a sequence (created on first use, grown by
        doubling) and forget what was cached from `start` on."""
        if seq_id not in self._len:
            self.add_sequence(seq_id, max(end, 64))
        cap = self._k[seq_id].shape[1]
        if end > cap:
            new = max(end, 2 * cap)
            for d in (self._k, self._v):
                old = d[seq_id]
                grown = old.new_empty((old.shape[0], new, *old.shape[2:]))
                grown[:, :cap] = old
                d[seq_id] = grown
        if start > self._len[seq_id]:
            raise ValueError(f"sequence {seq_id}: chunk starts at {start}, but only {self._len[seq_id]} cached")
        self._len[seq_id] = start

    def free(self, seq_id: int) -> None:
        for d in (self._k, self._v, self._len):
            d.pop(seq_id, None)

    def __len__(self) -> int:
        return len(self._len)

    def plan(self, seq_ids: list[int], query_lens: list[int]) -> ContiguousStep:
        """Reserve room for `query_lens[i]` new tokens of each sequence and describe the step."""
        starts = [0]
        ctx = []
        for sid, n in zip(seq_ids, query_lens):
            new_len = self._len[sid] + n
            if new_len > self._k[sid].shape[1]:
                raise ValueError(f"sequence {sid} outgrew its {self._k[sid].shape[1]}-token buffer")
            self._len[sid] = new_len
            ctx.append(new_len)
            starts.append(starts[-1] + n)
        return ContiguousStep(tuple(seq_ids), tuple(starts), tuple(ctx))

    def attend(
        self, step: ContiguousStep, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D] → [T, H, D]
        out = torch.empty_like(q)
        scale = self.config.attn_scale
        for i, sid in enumerate(step.seq_ids):
            s, e = step.query_start[i], step.query_start[i + 1]
            ctx = step.context_lens[i]
            n = e - s
            past = ctx - n
            kb, vb = self._k[sid][layer], self._v[sid][layer]
            kb[past:ctx] = k[s:e]
            vb[past:ctx] = v[s:e]
            qi = q[s:e].transpose(0, 1)  # [H, n, D]
            ki = kb[:ctx].transpose(0, 1)  # [KVH, ctx, D]
            vi = vb[:ctx].transpose(0, 1)
            mask = None
            if n > 1:
                # query j sits at position past + j and sees keys 0..past + j
                mask = torch.arange(ctx, device=q.device)[None, :] <= (past + torch.arange(n, device=q.device))[:, None]
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)
            out[s:e] = o.transpose(0, 1)
        return out
