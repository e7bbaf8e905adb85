"""Products of a few tokens against block-quantized weights (numba_kernels.cpu_qmatmul) against a
float64 reference of the dequantized weights, on fresh random inputs; and the model's
`linear` taking that path for exactly the weights it is given codes for."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from inflightd.models import llama
from inflightd.models.cpu_paths import CpuPaths
from numba_kernels import cpu_qmatmul


def _rng(*params: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(params).encode()))


def _weights(rng: np.random.Generator, rows: int, cols: int, offsets: bool, bits: int) -> tuple[np.ndarray, ...]:
    nb = cols // 32
    if bits == 4:  # Q4-like: codes 0..15, two per byte
        q = rng.integers(0, 256, (rows, cols // 2)).astype(np.uint8)
    else:  # Q8_0-like: signed codes
        q = rng.integers(-128, 128, (rows, cols)).astype(np.int8)
    m = (-rng.random((rows, nb)) * 0.1).astype(np.float32) if offsets else None
    d = (rng.random((rows, nb)) * 0.02 + 1e-3).astype(np.float32)
    return q, d, m


def _dense(q: np.ndarray, d: np.ndarray, m: np.ndarray | None, bits: int) -> np.ndarray:
    codes = cpu_qmatmul.unpack(q, bits).astype(np.float64)
    rows, cols = codes.shape
    w = codes.reshape(rows, -1, 32) * d[:, :, None]
    return (w if m is None else w + m[:, :, None]).reshape(rows, cols)


def test_unpack_orders_the_nibbles_as_documented() -> None:
    """Byte k (k < 8) of a 4-bit block holds elements k (low nibble) and k + 8; byte 8 + k
    elements 16 + k and 24 + k."""
    q = np.zeros((2, 16), np.uint8)
    q[0, 3] = 0x5A
    q[1, 12] = 0xC1
    codes = cpu_qmatmul.unpack(q, 4)
    want = np.zeros((2, 32), np.int16)
    want[0, 3], want[0, 11] = 0xA, 0x5
    want[1, 20], want[1, 28] = 0x1, 0xC
    assert np.array_equal(codes, want)


@pytest.mark.parametrize("rows,cols", [(2, 32), (960, 576), (576, 1536), (3072, 576), (34, 4096)])
@pytest.mark.parametrize("offsets", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("nchunks", [1, 2, 5])
def test_qgemv_matches_float64(rows: int, cols: int, offsets: bool, bits: int, nchunks: int) -> None:
    rng = _rng(rows, cols, offsets, bits, nchunks)
    q, d, m = _weights(rng, rows, cols, offsets, bits)
    x = rng.standard_normal(cols).astype(np.float32)
    want = _dense(q, d, m, bits) @ x.astype(np.float64)
    got = cpu_qmatmul.qgemv(x, q, d, m, bits, nchunks)
    assert got.shape == (rows,) and np.isfinite(got).all()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5


def test_qgemv_refuses_other_code_widths() -> None:
    q, d, m = _weights(_rng("bits"), 2, 32, True, 8)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        cpu_qmatmul.qgemv(np.ones(32, np.float32), q, d, m, 5, 1)


@pytest.mark.parametrize("tokens", [2, 3, 4, 5, 7, 9, 12])
@pytest.mark.parametrize("offsets", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_qgemm_matches_float64_and_each_token_alone(tokens: int, offsets: bool, bits: int) -> None:
    """Tokens go through in groups of cpu_qmatmul.GROUP; every row of the result must equal,
    bit for bit, the product of that token alone (batch invariance), and the float64 product."""
    rng = _rng(tokens, offsets, bits)
    q, d, m = _weights(rng, 962, 576, offsets, bits)
    x = rng.standard_normal((tokens, 576)).astype(np.float32)
    want = x.astype(np.float64) @ _dense(q, d, m, bits).T
    got = cpu_qmatmul.qgemm(x, q, d, m, bits, 2)
    assert got.shape == (tokens, 962) and np.isfinite(got).all()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
    for t in range(tokens):
        assert np.array_equal(got[t], cpu_qmatmul.qgemv(x[t], q, d, m, bits, 3))


def test_qgemm_refuses_x_of_the_wrong_width() -> None:
    q, d, m = _weights(_rng("width"), 2, 64, True, 4)
    with pytest.raises(ValueError, match=r"x must be \[tokens, 64\]"):
        cpu_qmatmul.qgemm(np.ones((3, 32), np.float32), q, d, m, 4, 1)


def test_linear_uses_codes_for_a_few_tokens_only() -> None:
    """Up to qgemm_max_tokens tokens go through the codes (a weight whose float copy disagrees
    shows it), more through float32 BLAS; both agree with the float64 product where they should."""
    rng = _rng("linear")
    q, d, m = _weights(rng, 64, 128, True, 4)
    wq = llama.QuantWeight(q, d, m, 4)
    dense = torch.from_numpy(_dense(q, d, m, 4).astype(np.float32))
    bias = torch.from_numpy(rng.standard_normal(64).astype(np.float32))
    cpu = CpuPaths()
    for n in (1, cpu.settings.qgemm_max_tokens):
        x = torch.from_numpy(rng.standard_normal((n, 128)).astype(np.float32))
        want = x.double() @ dense.double().T + bias.double()
        got = cpu.linear(x, dense, bias, wq)
        assert float((got.double() - want).norm() / want.norm()) <= 1e-5
        assert torch.allclose(cpu.linear(x, torch.zeros_like(dense), bias, wq), got)  # the codes
    n = cpu.settings.qgemm_max_tokens + 1
    x = torch.from_numpy(rng.standard_normal((n, 128)).astype(np.float32))
    assert torch.equal(cpu.linear(x, torch.zeros_like(dense), None, wq), torch.zeros(n, 64))
