"""Float64 references and random cases for the paged-cache kernels, shared by the CPU and CUDA
kernel tests. Everything here is deliberately naive: a loop per sequence over a gathered,
contiguous copy of its context."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PagedCase:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, unused entries -1
    context_lens: torch.Tensor  # [num_seqs] int32, incl. the new tokens
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    scale: float


def random_case(
    rng: np.random.Generator,
    query_lens: list[int],
    context_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    spare_blocks: int = 3,
) -> PagedCase:
    """Sequences whose physical blocks are shuffled across the pool; the cache is filled with
    random values everywhere (also in blocks nobody owns), so reading a wrong block shows."""
    need = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(need) + spare_blocks
    perm = rng.permutation(num_blocks)
    max_blocks = max(need) + 1
    tables = np.full((len(context_lens), max_blocks), -1, dtype=np.int32)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[at : at + n]
        at += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.from_numpy(rng.standard_normal(shape)).to(dtype)
    v = torch.from_numpy(rng.standard_normal(shape)).to(dtype)
    starts = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    q = torch.from_numpy(rng.standard_normal((int(starts[-1]), num_heads, head_dim))).to(dtype)
    return PagedCase(
        q,
        k,
        v,
        torch.from_numpy(tables),
        torch.tensor(context_lens, dtype=torch.int32),
        torch.from_numpy(starts),
        1.0 / head_dim**0.5,
    )


def gather_context(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """[length, num_kv_heads, head_dim] float64: a sequence's cached positions, in order."""
    bs = cache.shape[1]
    blocks = [cache[int(b)] for b in table[: -(-length // bs)]]
    return torch.cat(blocks).double()[:length]


def reference_attention(c: PagedCase) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole cached context (the new
    tokens' K/V are already in the cache): token j of a chunk of n sits at position ctx - n + j."""
    out = torch.empty(c.q.shape, dtype=torch.float64)
    group = c.q.shape[1] // c.k_cache.shape[2]
    for i in range(len(c.context_lens)):
        s, e = int(c.query_start_loc[i]), int(c.query_start_loc[i + 1])
        ctx = int(c.context_lens[i])
        if e == s:
            continue
        k = gather_context(c.k_cache, c.block_tables[i], ctx).repeat_interleave(group, dim=1)
        v = gather_context(c.v_cache, c.block_tables[i], ctx).repeat_interleave(group, dim=1)
        q = c.q[s:e].double()
        scores = torch.einsum("nhd,chd->hnc", q, k) * c.scale
        pos = ctx - (e - s) + torch.arange(e - s)
        scores = scores.masked_fill(torch.arange(ctx)[None, None, :] > pos[None, :, None], float("-inf"))
        out[s:e] = torch.einsum("hnc,chd->nhd", scores.softmax(-1), v)
    return out


def reference_write(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the caches with token t written at slot_mapping[t] (skipped where -1)."""
    k, v = k_cache.clone(), v_cache.clone()
    bs = k.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k[slot // bs, slot % bs] = key[t]
            v[slot // bs, slot % bs] = value[t]
    return k, v


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())
