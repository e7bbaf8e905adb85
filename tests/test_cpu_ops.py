"""The fused CPU RMSNorm / RoPE (numba_kernels.cpu_ops) that the model uses for small float32
batches: RMSNorm against a float64 reference, RoPE bit for bit against the torch path
(inflightd.models.llama.apply_rope), on fresh random inputs."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from inflightd.models import llama
from inflightd.models.cpu_paths import CpuPaths
from numba_kernels import cpu_ops


def _gen(*params: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


@pytest.mark.parametrize("tokens,hidden", [(1, 576), (7, 576), (64, 576), (3, 4096), (2, 80)])
def test_rms_norm_matches_float64(tokens: int, hidden: int) -> None:
    g = _gen("norm", tokens, hidden)
    x = torch.randn(tokens, hidden, generator=g) * 3 + 0.5
    w = torch.randn(hidden, generator=g)
    eps = 1e-5
    xd = x.double()
    ref = w.double() * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps))
    got = torch.from_numpy(cpu_ops.rms_norm(x.numpy(), w.numpy(), eps))
    assert float((got.double() - ref).norm() / ref.norm()) <= 1e-6
    # The model's entry point takes this path for small batches, and torch's beyond it.
    assert torch.equal(CpuPaths().rms_norm(x, w, eps), got)


def test_rms_norm_strided_rows() -> None:
    g = _gen("strided")
    x = torch.randn(5, 96, generator=g)[:, :64]  # rows 96 apart
    w = torch.randn(64, generator=g)
    got = cpu_ops.rms_norm(x.numpy(), w.numpy(), 1e-6)
    want = cpu_ops.rms_norm(x.contiguous().numpy(), w.numpy(), 1e-6)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("heads,kv_heads,head_dim,rope_dim",
                         [(9, 3, 64, 64), (4, 4, 128, 128), (8, 2, 80, 32)])
def test_rope_bit_identical_to_torch(heads: int, kv_heads: int, head_dim: int, rope_dim: int) -> None:
    """q and k heads rotated in place in the fused qkv rows; v untouched; partial rotary
    (rope_dim < head_dim) leaves the rest of each head as it was."""
    tokens = 6
    g = _gen("rope", heads, kv_heads, head_dim, rope_dim)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=g)
    positions = torch.randint(0, 4000, (tokens,), generator=g)
    inv = 1.0 / (10000.0 ** (torch.arange(0, rope_dim, 2).float() / rope_dim))
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    cos, sin = emb.cos(), emb.sin()
    q_want = llama.apply_rope(qkv[:, :q_size].reshape(tokens, heads, head_dim), cos, sin)
    k_want = llama.apply_rope(qkv[:, q_size:q_size + kv_size].reshape(tokens, kv_heads, head_dim),
                              cos, sin)
    got = qkv.clone()
    cpu_ops.rope_(got.numpy(), cos.reshape(tokens, -1).numpy(), sin.reshape(tokens, -1).numpy(),
                  heads + kv_heads, head_dim)
    assert torch.equal(got[:, :q_size].reshape(tokens, heads, head_dim), q_want)
    assert torch.equal(got[:, q_size:q_size + kv_size].reshape(tokens, kv_heads, head_dim), k_want)
    assert torch.equal(got[:, q_size + kv_size:], qkv[:, q_size + kv_size:])
