"""One-token products against block-quantized weights (numba_kernels.cpu_qmatmul) against a
float64 reference of the dequantized weights, on fresh random inputs; and the model's
`linear` taking that path for exactly the weights it is given codes for."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from inflightd.models import llama
from numba_kernels import cpu_qmatmul


def _rng(*params: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(params).encode()))


def _weights(rng: np.random.Generator, rows: int, cols: int, offsets: bool) -> tuple[np.ndarray, ...]:
    nb = cols // 32
    if offsets:  # Q4_1-like: codes 0..15, scale and minimum per block
        q = rng.integers(0, 16, (rows, cols)).astype(np.int8)
        m = (-rng.random((rows, nb)) * 0.1).astype(np.float32)
    else:  # Q8_0-like: signed codes, no offset
        q = rng.integers(-128, 128, (rows, cols)).astype(np.int8)
        m = np.zeros((rows, nb), np.float32)
    d = (rng.random((rows, nb)) * 0.02 + 1e-3).astype(np.float32)
    return q, d, m


def _dense(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    rows, cols = q.shape
    return (q.astype(np.float64).reshape(rows, -1, 32) * d[:, :, None] + m[:, :, None]).reshape(rows, cols)


@pytest.mark.parametrize("rows,cols", [(2, 32), (960, 576), (576, 1536), (3072, 576), (34, 4096)])
@pytest.mark.parametrize("offsets", [True, False])
@pytest.mark.parametrize("nchunks", [1, 2, 5])
def test_qgemv_matches_float64(rows: int, cols: int, offsets: bool, nchunks: int) -> None:
    rng = _rng(rows, cols, offsets, nchunks)
    q, d, m = _weights(rng, rows, cols, offsets)
    x = rng.standard_normal(cols).astype(np.float32)
    want = _dense(q, d, m) @ x.astype(np.float64)
    got = cpu_qmatmul.qgemv(x, q, d, m, nchunks)
    assert got.shape == (rows,) and np.isfinite(got).all()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5


def test_linear_uses_codes_for_one_token_only() -> None:
    """One token goes through the codes (a weight whose float copy disagrees shows it), more
    than one through float32 BLAS; both agree with the float64 product where they should."""
    rng = _rng("linear")
    q, d, m = _weights(rng, 64, 128, True)
    wq = llama.QuantWeight(q, d, m)
    dense = torch.from_numpy(_dense(q, d, m).astype(np.float32))
    bias = torch.from_numpy(rng.standard_normal(64).astype(np.float32))
    x1 = torch.from_numpy(rng.standard_normal((1, 128)).astype(np.float32))
    want = x1.double() @ dense.double().T + bias.double()
    got = llama.linear(x1, dense, bias, wq)
    assert float((got.double() - want).norm() / want.norm()) <= 1e-5
    assert torch.allclose(llama.linear(x1, torch.zeros_like(dense), bias, wq), got)  # the codes
    x4 = torch.from_numpy(rng.standard_normal((4, 128)).astype(np.float32))
    assert torch.equal(llama.linear(x4, torch.zeros_like(dense), None, wq), torch.zeros(4, 64))
