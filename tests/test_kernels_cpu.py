"""CPU paged-cache kernels (numba_kernels) against the float64 references in paged_reference.py.

Every case draws fresh random inputs (seeded from its parameters) over shuffled physical blocks,
and poisons the output with NaN first, so an element the kernel never writes fails the check.
float32 must match to 1e-5 (relative, whole output). bfloat16 inputs are compared against the
reference computed on the same bf16 values, so the only extra error is rounding the output to
bf16: round-to-nearest moves each element by at most half an ulp, i.e. 2**-8 of its magnitude
(8 significant bits), hence ||out - ref|| <= 2**-8 ||ref|| (plus the float32 term).
"""
from __future__ import annotations

import os
import sys
import zlib

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # paged_reference, also without rootdir conftest

from paged_reference import (  # noqa: E402
    random_case,
    reference_attention,
    reference_write,
    rel_err,
)

import numba_kernels as nk  # noqa: E402
from numba_kernels import cpu  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8 + 1e-5}


def _rng(*params: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(params).encode()))


def _poisoned(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


# (num_heads, num_kv_heads, head_dim, block_size): MHA, GQA 3 and 8, every head_dim and block
# size; the first row is the default model's shapes.
SHAPES = [
    (9, 3, 64, 16),
    (4, 4, 80, 8),
    (8, 1, 128, 32),
    (6, 2, 96, 16),
    (12, 4, 64, 8),
    (3, 1, 128, 16),
]


def _lens(block_size: int) -> list[int]:
    """Odd lengths, one, exactly on a block boundary, one past it, and a long one."""
    return [1, 7, block_size, block_size + 1, 3 * block_size, 3 * block_size + 1, 333]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    h, kvh, d, bs = shape
    lens = _lens(bs)
    c = random_case(_rng("decode", shape, dtype), [1] * len(lens), lens, num_heads=h,
                    num_kv_heads=kvh, head_dim=d, block_size=bs, dtype=dtype)
    out = _poisoned(c.q)
    nk.paged_attention_decode(out, c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens,
                              c.scale)
    assert rel_err(out, reference_attention(c)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_prefill(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    """Whole prompts (n == context), chunks after a cached prefix (n < context), a zero-length
    chunk, a decode-sized chunk in the same batch, and chunks spanning several query tiles."""
    h, kvh, d, bs = shape
    qlens = [5, 0, 40, 1, 17, 2 * bs + 3, 33]
    ctx = [5, 9, 40, 70, 17 + 2 * bs, 2 * bs + 3, 100]
    c = random_case(_rng("prefill", shape, dtype), qlens, ctx, num_heads=h, num_kv_heads=kvh,
                    head_dim=d, block_size=bs, dtype=dtype)
    out = _poisoned(c.q)
    nk.paged_attention_prefill(out, c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens,
                               c.query_start_loc, c.scale)
    assert rel_err(out, reference_attention(c)) <= TOL[dtype]


@pytest.mark.parametrize("serial_work", [0, 1 << 40])
@pytest.mark.parametrize("shape", SHAPES)
def test_serial_and_parallel_paths(shape: tuple[int, int, int, int], serial_work: int) -> None:
    """Small batches run on the calling thread (cpu.SERIAL_WORK), so drive both paths with
    the same small decode and prefill batch."""
    h, kvh, d, bs = shape
    c = random_case(_rng("paths", shape, serial_work), [1, 1, 5, 1], [7, bs + 1, 2 * bs, 40],
                    num_heads=h, num_kv_heads=kvh, head_dim=d, block_size=bs)
    out = _poisoned(c.q)
    cpu.attention(out.numpy(), c.q.numpy(), c.k_cache.numpy(), c.v_cache.numpy(),
                  c.block_tables.numpy(), c.context_lens.numpy(), c.query_start_loc.numpy(),
                  c.scale, nthreads=2, serial_work=serial_work)
    assert rel_err(out, reference_attention(c)) <= 1e-5


def test_cache_views_are_remembered_and_dropped() -> None:
    """The dispatcher remembers validated cache pairs by identity; the entry must go when a
    tensor dies (its id and address may then be reused by another cache)."""
    import gc

    k = torch.randn(4, 16, 3, 64)
    v = torch.randn(4, 16, 3, 64)
    before = len(nk._CACHES)
    a, b = nk._caches(k, v)
    assert np.shares_memory(a, k.numpy()) and np.array_equal(b, v.numpy())
    assert nk._caches(k, v)[0] is a
    del k
    gc.collect()
    assert len(nk._CACHES) == before
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        nk._caches(torch.randn(4, 3, 16, 64).transpose(1, 2), v)


@pytest.mark.parametrize("nthreads", [1, 2, 5])
def test_context_split_and_merge(nthreads: int) -> None:
    """Few long sequences are split along the context (flash-decoding) and merged; the plan
    depends on the thread count, so drive the kernel with several counts directly."""
    c = random_case(_rng("split", nthreads), [1, 3], [1000, 517], num_heads=9, num_kv_heads=3,
                    head_dim=64, block_size=16)
    out = _poisoned(c.q)
    cpu.attention(out.numpy(), c.q.numpy(), c.k_cache.numpy(), c.v_cache.numpy(),
                  c.block_tables.numpy(), c.context_lens.numpy(), c.query_start_loc.numpy(),
                  c.scale, nthreads=nthreads)
    assert rel_err(out, reference_attention(c)) <= 1e-5


def test_prefill_of_one_token_is_decode() -> None:
    c = random_case(_rng("same"), [1, 1, 1], [16, 17, 250], num_heads=9, num_kv_heads=3,
                    head_dim=64, block_size=16)
    a, b = _poisoned(c.q), _poisoned(c.q)
    nk.paged_attention_decode(a, c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens,
                              c.scale)
    nk.paged_attention_prefill(b, c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens,
                               c.query_start_loc, c.scale)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache(dtype: torch.dtype) -> None:
    rng = _rng("write", dtype)
    nb, bs, kvh, d = 6, 16, 3, 64
    k_cache = torch.from_numpy(rng.standard_normal((nb, bs, kvh, d))).to(dtype)
    v_cache = torch.from_numpy(rng.standard_normal((nb, bs, kvh, d))).to(dtype)
    slots = torch.tensor([37, -1, 0, 95, -1, 16, 15], dtype=torch.int64)  # -1: padding
    key = torch.from_numpy(rng.standard_normal((len(slots), kvh, d))).to(dtype)
    value = torch.from_numpy(rng.standard_normal((len(slots), kvh, d))).to(dtype)
    want_k, want_v = reference_write(key, value, k_cache, v_cache, slots)
    nk.write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_copy_blocks() -> None:
    rng = _rng("copy")
    k = torch.from_numpy(rng.standard_normal((8, 16, 3, 64)).astype(np.float32))
    v = torch.from_numpy(rng.standard_normal((8, 16, 3, 64)).astype(np.float32))
    src, dst = torch.tensor([1, 4, 1]), torch.tensor([0, 6, 7])
    want_k, want_v = k.clone(), v.clone()
    for s, t in zip(src.tolist(), dst.tolist()):
        want_k[t], want_v[t] = k[s], v[s]
    nk.copy_blocks(k, v, src, dst)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


def _decode_args() -> dict[str, object]:
    c = random_case(_rng("bad"), [1, 1], [20, 5], num_heads=9, num_kv_heads=3, head_dim=64,
                    block_size=16)
    return dict(out=torch.empty_like(c.q), query=c.q, k_cache=c.k_cache, v_cache=c.v_cache,
                block_tables=c.block_tables, context_lens=c.context_lens, scale=c.scale)


@pytest.mark.parametrize("name, bad", [
    ("query", lambda a: a["query"].double()),
    ("query", lambda a: a["query"][:, :, :32].contiguous()),
    ("query", lambda a: torch.empty(a["query"].shape, device="meta")),
    ("out", lambda a: a["out"][:1]),
    ("query", lambda a: a["query"][:, :7].contiguous()),
    ("k_cache", lambda a: a["k_cache"].half()),
    ("v_cache", lambda a: a["v_cache"][:-1].contiguous()),
    ("block_tables", lambda a: a["block_tables"].long()),
    ("context_lens", lambda a: a["context_lens"][:1]),
    ("context_lens", lambda a: a["context_lens"] + 100),
    ("block_tables", lambda a: a["block_tables"] + 1000),
    ("query", lambda a: a["query"].transpose(0, 1)),
])
def test_bad_decode_inputs(name: str, bad) -> None:
    args = _decode_args()
    args[name] = bad(args)
    with pytest.raises(ValueError, match=name):
        nk.paged_attention_decode(**args)


def test_bad_prefill_and_cache_op_inputs() -> None:
    a = _decode_args()
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="query_start_loc"):
        nk.paged_attention_prefill(a["out"], a["query"], a["k_cache"], a["v_cache"],
                                   a["block_tables"], a["context_lens"], qsl.long(), 1.0)
    with pytest.raises(ValueError, match="query_start_loc"):
        nk.paged_attention_prefill(a["out"], a["query"], a["k_cache"], a["v_cache"],
                                   a["block_tables"], a["context_lens"],
                                   torch.tensor([0, 2, 1], dtype=torch.int32), 1.0)
    kv = torch.zeros(2, 3, 64)
    with pytest.raises(ValueError, match="slot_mapping"):
        nk.write_kv_cache(kv, kv, a["k_cache"], a["v_cache"], torch.tensor([0, 1]).int())
    with pytest.raises(ValueError, match="slot_mapping"):
        nk.write_kv_cache(kv, kv, a["k_cache"], a["v_cache"], torch.tensor([0, 10**6]))
    with pytest.raises(ValueError, match="value"):
        nk.write_kv_cache(kv, kv.bfloat16(), a["k_cache"], a["v_cache"], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="dst"):
        nk.copy_blocks(a["k_cache"], a["v_cache"], torch.tensor([0]), torch.tensor([0]).int())
    with pytest.raises(ValueError, match="src"):
        nk.copy_blocks(a["k_cache"], a["v_cache"], torch.tensor([99]), torch.tensor([0]))
