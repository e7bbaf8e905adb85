"""inflightd.models.dequant against gguf-py's numpy reference (gguf.quants.dequantize)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from inflightd.models import dequant
from inflightd.models.dequant import SUPPORTED, UnsupportedQuantError, dequantize
from numba_kernels import cpu_qmatmul

T = GGMLQuantizationType

# Byte offsets of the fp16 scale fields (d, and m/dmin where present) inside one block.
FP16_FIELDS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}
BLOCK_TYPES = sorted(FP16_FIELDS, key=int)
# Types gguf-py can also quantize, so valid data can come from real floats too.
QUANTIZABLE = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.BF16]
# (rows..., blocks per row): single block, several rows, and a 3-D tensor.
LAYOUTS = [((1,), 1), ((5,), 3), ((2, 3), 2), ((17,), 4)]


def _shape(qtype: GGMLQuantizationType, lead: tuple[int, ...], blocks: int) -> tuple[int, ...]:
    return (*lead, blocks * GGML_QUANT_SIZES[qtype][0])


def _random_fp16_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    # Any bit pattern but inf/NaN: covers subnormals, zeros of both signs and large values.
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    exponent_all_ones = (bits & 0x7C00) == 0x7C00
    bits = np.where(exponent_all_ones, bits & 0x83FF, bits).astype(np.uint16)
    return bits.view(np.uint8).reshape(n, 2)


def _random_blocks(rng: np.random.Generator, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Random uint8 tensor data laid out as gguf.GGUFReader returns it: [..., row_bytes]."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    byte_shape = (*shape[:-1], shape[-1] // block_size * type_size)
    raw = rng.integers(0, 256, byte_shape, dtype=np.uint8)
    blocks = raw.reshape(-1, type_size)
    for offset in FP16_FIELDS[qtype]:
        blocks[:, offset : offset + 2] = _random_fp16_bytes(rng, blocks.shape[0])
    return raw


def _reference(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    ref = gguf.quants.dequantize(raw, qtype)
    return torch.from_numpy(np.array(ref, dtype=np.float32)).reshape(shape)


def _assert_bit_identical(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32
    assert got.shape == want.shape
    assert torch.isfinite(want).all()
    # Same op order as the reference, so float32 results match to the bit, not just within 1e-6.
    mismatched = (got.view(torch.int32) != want.view(torch.int32)).sum().item()
    assert mismatched == 0, f"{mismatched} of {want.numel()} elements differ"


def test_supported_set() -> None:
    required = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K}
    assert required <= SUPPORTED
    assert set(FP16_FIELDS) | {T.F32, T.F16, T.BF16} == set(SUPPORTED)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"{lay[0]}x{lay[1]}blk")
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_random_blocks_match_reference(qtype: GGMLQuantizationType, layout) -> None:
    rng = np.random.default_rng([int(qtype), *layout[0], layout[1]])
    shape = _shape(qtype, *layout)
    raw = _random_blocks(rng, qtype, shape)
    want = _reference(raw, qtype, shape)

    _assert_bit_identical(dequantize(raw, qtype, shape), want)
    # bf16 output is the float32 result rounded once, nothing more.
    assert torch.equal(dequantize(raw, qtype, shape, torch.bfloat16), want.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_floats_match_reference(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(int(qtype))
    shape = (9, 4 * GGML_QUANT_SIZES[qtype][0])
    values = (rng.standard_normal(shape) * rng.uniform(1e-3, 10.0, (9, 1))).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    want = _reference(raw, qtype, shape)

    _assert_bit_identical(dequantize(raw, qtype, shape), want)
    assert torch.equal(dequantize(raw, qtype, shape, torch.bfloat16), want.to(torch.bfloat16))


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_float_types_from_typed_arrays(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape))
    values = rng.standard_normal(shape).astype(np.float32) * 100
    # GGUFReader hands F32/F16 over as typed arrays and BF16 as bytes.
    cases = {
        T.F32: values,
        T.F16: values.astype(np.float16),
        T.BF16: gguf.quants.quantize(values, T.BF16),
    }
    for qtype, raw in cases.items():
        want = _reference(raw, qtype, shape)
        _assert_bit_identical(dequantize(raw, qtype, shape), want)
        for dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(dequantize(raw, qtype, shape, dtype), want.to(dtype)), (qtype, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", [T.F16, T.Q4_1, T.Q5_0, T.Q6_K], ids=lambda t: t.name)
def test_chunk_and_span_boundaries(
    qtype: GGMLQuantizationType, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Spans of 2 blocks, 3 spans per call, over 7 rows of 5 blocks: calls and spans
    # straddle rows and both the last call and its last span are ragged.
    block_size = GGML_QUANT_SIZES[qtype][0]
    monkeypatch.setattr(dequant, "_SPAN_ELEMENTS", 2 * block_size)
    monkeypatch.setattr(dequant, "_SPANS_PER_CALL", 3)
    rng = np.random.default_rng(7)
    shape = _shape(qtype, (7,), 5 if block_size > 1 else 160)
    if qtype in FP16_FIELDS:
        raw = _random_blocks(rng, qtype, shape)
    else:
        raw = rng.standard_normal(shape).astype(np.float16)
    want = _reference(raw, qtype, shape)
    got = dequantize(raw, qtype, shape, dtype)
    if dtype == torch.float32:
        _assert_bit_identical(got, want)
    else:
        assert torch.equal(got, want.to(dtype))


def test_result_owns_its_memory() -> None:
    rng = np.random.default_rng(1)
    shape = (4, 64)
    raw = _random_blocks(rng, T.Q8_0, shape)
    got = dequantize(raw, T.Q8_0, shape)
    before = got.clone()
    raw[...] = 0
    assert torch.equal(got, before)

    values = rng.standard_normal(shape).astype(np.float32)
    got = dequantize(values, T.F32, shape)
    values[...] = 0
    assert torch.count_nonzero(got) > 0


def test_read_only_input_is_accepted() -> None:
    rng = np.random.default_rng(2)
    shape = (3, 256)
    raw = _random_blocks(rng, T.Q4_K, shape)
    raw.setflags(write=False)  # like GGUFReader's mmap views
    _assert_bit_identical(dequantize(raw, T.Q4_K, shape), _reference(raw, T.Q4_K, shape))


def test_unsupported_type_is_named() -> None:
    raw = np.zeros((1, GGML_QUANT_SIZES[T.Q2_K][1]), dtype=np.uint8)
    with pytest.raises(UnsupportedQuantError, match="Q2_K") as excinfo:
        dequantize(raw, T.Q2_K, (1, 256))
    message = str(excinfo.value)
    for name in ("F32", "Q4_K", "Q6_K", "Q8_0"):
        assert name in message
    assert isinstance(excinfo.value, ValueError)

    with pytest.raises(UnsupportedQuantError, match="999"):
        dequantize(raw, 999, (1, 256))  # type: ignore[arg-type]


def test_bad_sizes_are_value_errors() -> None:
    raw = np.zeros((2, 20), dtype=np.uint8)
    with pytest.raises(ValueError, match="bytes"):
        dequantize(raw, T.Q4_1, (3, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        dequantize(raw, T.Q4_1, (4, 16))
    with pytest.raises(ValueError, match="floating point"):
        dequantize(raw, T.Q4_1, (2, 32), torch.int32)


def _sampled(tensors: list[Any]) -> list[Any]:
    # Every non-layer tensor, plus the first, middle and last layers: each tensor kind and
    # shape of the model once per position, at a fraction of the full reference cost.
    layers = sorted({int(t.name.split(".")[1]) for t in tensors if t.name.startswith("blk.")})
    keep = {layers[0], layers[len(layers) // 2], layers[-1]} if layers else set()
    return [t for t in tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) in keep]


@pytest.mark.slow
def test_default_model_matches_reference(default_gguf: Path) -> None:
    reader = gguf.GGUFReader(default_gguf)
    seen: set[str] = set()
    for tensor in _sampled(list(reader.tensors)):
        shape = tuple(int(n) for n in reversed(tensor.shape))
        want = _reference(tensor.data, tensor.tensor_type, shape)
        got = dequantize(tensor.data, tensor.tensor_type, shape)
        try:
            _assert_bit_identical(got, want)
        except AssertionError as exc:
            raise AssertionError(f"{tensor.name} ({tensor.tensor_type.name})") from exc
        seen.add(tensor.tensor_type.name)
    assert {"Q4_1", "Q8_0", "F32"} <= seen


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
                                   GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0])
def test_block_codes_rebuild_the_dequantized_weights(qtype: GGMLQuantizationType) -> None:
    """d * q + m per 32-element block (the form numba_kernels.cpu_qmatmul multiplies with) gives
    back exactly what dequantize gives, for random blocks of every type that has the form."""
    rng = np.random.default_rng(int(qtype))
    shape = (6, 4 * 32)
    raw = _random_blocks(rng, qtype, shape)
    codes = dequant.block_codes(raw, qtype, shape)
    assert codes is not None
    q, d, m, bits = codes
    four = qtype in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)
    assert bits == (4 if four else 8)
    assert q.dtype == (torch.uint8 if four else torch.int8) and q.shape == (6, 4 * 32 * bits // 8)
    assert d.shape == (6, 4) and d.dtype == torch.float32
    assert (m is None) == (qtype in (GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q8_0))
    values = torch.from_numpy(cpu_qmatmul.unpack(q.numpy(), bits)).float().view(6, 4, 32)
    rebuilt = (values * d[:, :, None] + (0.0 if m is None else m[:, :, None])).view(shape)
    assert torch.equal(codes.widened().q.to(torch.int16), torch.from_numpy(cpu_qmatmul.unpack(q.numpy(), bits)))
    want = dequantize(raw, qtype, shape)
    # Equal values (for the symmetric types, -0.0 * d + 0 is +0.0 where dequantize has -0.0).
    assert torch.isfinite(want).all() and torch.equal(rebuilt, want)


def test_block_codes_only_for_affine_block_types() -> None:
    rng = np.random.default_rng(7)
    shape = (2, 256)
    raw = _random_blocks(rng, GGMLQuantizationType.Q4_K, shape)
    assert dequant.block_codes(raw, GGMLQuantizationType.Q4_K, shape) is None
    assert dequant.block_codes(np.zeros(64, np.float32), GGMLQuantizationType.F32, (2, 32)) is None


def test_fused_codes_of_mixed_types_widen_to_one_byte() -> None:
    """q and k in Q4_1 (4-bit codes) with v in Q8_0 (8-bit) stack as one 8-bit weight whose
    one-token product is the dequantized stack's; o alone keeps its 4-bit codes."""
    from types import SimpleNamespace

    from inflightd.models.loader import _attach_block_codes

    rng = np.random.default_rng(11)
    parts = {"attn_q": (T.Q4_1, (64, 96)), "attn_k": (T.Q4_1, (32, 96)), "attn_v": (T.Q8_0, (32, 96)),
             "attn_output": (T.Q4_1, (96, 64))}
    tensors = {}
    for name, (qtype, shape) in parts.items():
        raw = _random_blocks(rng, qtype, shape)
        blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])
        for offset in FP16_FIELDS[qtype]:  # modest scales: a float64 reference stays meaningful
            blocks[:, offset : offset + 2] = (rng.random((blocks.shape[0], 1)) * 0.1).astype(np.float16).view(np.uint8)
        tensors[f"blk.0.{name}.weight"] = SimpleNamespace(data=raw, qtype=qtype, shape=shape)
    layer = SimpleNamespace()
    head = object()
    weights = SimpleNamespace(layers=[layer], embed=head, lm_head=head)
    _attach_block_codes(SimpleNamespace(num_heads=2, num_kv_heads=1), weights, tensors, False)  # type: ignore[arg-type]
    assert layer.qkv_q.bits == 8 and layer.qkv_q.q.shape == (128, 96) and layer.o_q.bits == 4
    assert layer.gate_up_q is None and weights.lm_head_q is None  # no such tensors
    qkv = ("attn_q", "attn_k", "attn_v")
    dense = torch.cat([dequantize(tensors[f"blk.0.{n}.weight"].data, *parts[n]) for n in qkv])
    x = rng.standard_normal(96).astype(np.float32)
    want = dense.double().numpy() @ x.astype(np.float64)
    wq = layer.qkv_q
    got = cpu_qmatmul.qgemv(x, wq.q, wq.d, wq.m, wq.bits, 2)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
