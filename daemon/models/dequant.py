"""Dequantization of GGUF tensor data into torch tensors.

This module owns the translation from ggml's on-disk block formats (the layouts of
ggml-quants.c, mirrored by gguf-py's ``gguf/quants.py``) into dense torch tensors. Blocks
are decoded with vectorised torch ops over thousands of blocks at a time (never a Python
loop over blocks), in float32 and in the same operation order as gguf-py's numpy
reference, so float32 results are bit-identical to it; other dtypes are rounded once from
those float32 values.

Input is consumed in chunks of blocks: each chunk's bytes are copied out of the (usually
read-only, mmap-backed) reader array, decoded, and written straight into the preallocated
output, so the result never references the mmap and peak memory is the output plus about
a megabyte of temporaries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["SUPPORTED", "UnsupportedQuantError", "dequantize"]

_T = GGMLQuantizationType

# Elements per kernel call. Kept just under ATen's intra-op GRAIN_SIZE (32768), so every
# kernel runs serially on the calling thread: on a loaded or oversubscribed CPU, torch's
# parallel kernels stall at each fork/join waiting for a descheduled worker, which made
# whole-model decoding over 10x slower on a busy 2-core host, while serial kernels degrade
# only in proportion to the load. Parallelism, where wanted, comes from decoding several
# tensors on separate threads (torch releases the GIL inside kernels). A multiple of 256,
# so a span is whole blocks of every type.
_SPAN_ELEMENTS = 32768 - 256
# Spans per decoder call. Per-block values (scales, offsets: at most 16 per 256 elements)
# are decoded once per call, still under GRAIN_SIZE, amortising those small kernels' fixed
# cost over several spans of element-sized work.
_SPANS_PER_CALL = 8


def _spans(n_blocks: int, block_size: int) -> list[slice]:
    step = _SPAN_ELEMENTS // block_size
    return [slice(i, i + step) for i in range(0, n_blocks, step)]


class UnsupportedQuantError(ValueError):
    """The tensor's GGML type has no decoder here."""


def _half(b: torch.Tensor, byte_offset: int, count: int = 1) -> torch.Tensor:
    # b: [n_blocks, type_size] uint8 -> [n_blocks, count] float32, the consecutive fp16
    # fields from byte_offset. Every block size is even and every fp16 field 2-aligned, so
    # the whole block can be viewed as float16 without copying.
    i = byte_offset // 2
    return b.view(torch.float16)[:, i : i + count].to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # qs: [n_blocks, 16] uint8 -> [n_blocks, 32] uint8.
    # ggml stores element j in the low nibble of byte j and element j+16 in the high one.
    q = torch.empty(qs.shape[0], 32, dtype=torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=q[:, :16])
    torch.bitwise_right_shift(qs, 4, out=q[:, 16:])
    return q


_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _or_fifth_bits(q: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    # q: [n_blocks, 32] uint8 nibbles, qh: [n_blocks, 4] uint8 (a little-endian uint32
    # whose bit j is the fifth bit of element j) -> q with those bits set, in place.
    bits = torch.bitwise_right_shift(qh.unsqueeze(-1), _BIT_SHIFTS)  # [n_blocks, 4, 8]
    bits.bitwise_and_(1).bitwise_left_shift_(4)
    return q.bitwise_or_(bits.view(q.shape))


# Decoders write float32 values into out: [n_blocks, block_size], in the same operation
# order as gguf-py so results are bit-identical. Integer codes are multiplied in directly:
# type promotion converts them to float32 (exactly) inside the multiply kernel, which saves
# a pass and a temporary. Element-sized work runs per span (see _SPAN_ELEMENTS).

# ---- 32-element block types ------------------------------------------------------------


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    # b: [n_blocks, 18] = d:f16 | qs[16]
    d = _half(b, 0)
    for s in _spans(b.shape[0], 32):
        q = _nibbles(b[s, 2:18]).view(torch.int8).sub_(8)
        torch.mul(q, d[s], out=out[s])


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    # b: [n_blocks, 20] = d:f16 | m:f16 | qs[16]
    dm = _half(b, 0, 2)
    for s in _spans(b.shape[0], 32):
        torch.mul(_nibbles(b[s, 4:20]), dm[s, 0:1], out=out[s])
        out[s].add_(dm[s, 1:2])


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    # b: [n_blocks, 22] = d:f16 | qh[4] | qs[16]
    d = _half(b, 0)
    for s in _spans(b.shape[0], 32):
        q = _or_fifth_bits(_nibbles(b[s, 6:22]), b[s, 2:6]).view(torch.int8).sub_(16)
        torch.mul(q, d[s], out=out[s])


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    # b: [n_blocks, 24] = d:f16 | m:f16 | qh[4] | qs[16]
    dm = _half(b, 0, 2)
    for s in _spans(b.shape[0], 32):
        q = _or_fifth_bits(_nibbles(b[s, 8:24]), b[s, 4:8])
        torch.mul(q, dm[s, 0:1], out=out[s])
        out[s].add_(dm[s, 1:2])


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    # b: [n_blocks, 34] = d:f16 | qs:int8[32]
    d = _half(b, 0)
    for s in _spans(b.shape[0], 32):
        torch.mul(b[s, 2:34].view(torch.int8), d[s], out=out[s])


# ---- 256-element super-block types (K-quants) ------------------------------------------

_NIBBLE_SHIFTS = torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
_CRUMB_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
_HIGH_SHIFTS = torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 2, 1)


def _k_scales(b: torch.Tensor) -> torch.Tensor:
    # b: [n_blocks, >=16] uint8 = d:f16 | dmin:f16 | scales[12] | ...
    # -> [n_blocks, 2, 8, 1] float32: [:, 0] is d * scale, [:, 1] is dmin * min, per
    # 32-element sub-block. Eight 6-bit scales and eight 6-bit mins are packed as
    # (get_scale_min_k4 in ggml):
    #   bytes 0-3:  hi2(scale 4-7) | scale 0-3      bytes 4-7: hi2(min 4-7) | min 0-3
    #   bytes 8-11: lo4(min 4-7)   | lo4(scale 4-7)
    n = b.shape[0]
    s = b[:, 4:16].reshape(n, 3, 4)
    low = s[:, 0:2] & 0x3F  # [n, 2, 4]: scales 0-3, mins 0-3
    high = (s[:, 2:3] >> _HIGH_SHIFTS).bitwise_and_(0x0F)  # [n, 2, 4]: lo4 of 4-7
    high.bitwise_or_((s[:, 0:2] >> 2).bitwise_and_(0x30))
    scale_min = torch.cat((low, high), dim=2)  # [n, 2, 8]
    return torch.mul(scale_min, _half(b, 0, 2).unsqueeze(-1)).unsqueeze(-1)


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    # qs: [n_blocks, 128] uint8 -> [n_blocks, 8, 32] uint8: each 32-byte group holds
    # sub-block 2i in its low nibbles and sub-block 2i+1 in its high nibbles.
    n = qs.shape[0]
    q = (qs.reshape(n, 4, 1, 32) >> _NIBBLE_SHIFTS).bitwise_and_(0x0F)  # [n, 4, 2, 32]
    return q.view(n, 8, 32)


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # b: [n_blocks, 144] = d:f16 | dmin:f16 | scales[12] | qs[128]
    sm = _k_scales(b)  # [n, 2, 8, 1]
    o = out.view(-1, 8, 32)
    for s in _spans(b.shape[0], 256):
        torch.mul(_k_low_nibbles(b[s, 16:144]), sm[s, 0], out=o[s])
        o[s].sub_(sm[s, 1])


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # b: [n_blocks, 176] = d:f16 | dmin:f16 | scales[12] | qh[32] | qs[128]
    sm = _k_scales(b)  # [n, 2, 8, 1]
    o = out.view(-1, 8, 32)
    for s in _spans(b.shape[0], 256):
        # Bit i of qh[j] is the fifth bit of element j of sub-block i.
        qh = torch.bitwise_right_shift(b[s, 16:48].unsqueeze(1), _BIT_SHIFTS.view(1, 8, 1))
        qh.bitwise_and_(1).bitwise_left_shift_(4)  # [n, 8, 32]
        q = _k_low_nibbles(b[s, 48:176]).bitwise_or_(qh)
        torch.mul(q, sm[s, 0], out=o[s])
        o[s].sub_(sm[s, 1])


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # b: [n_blocks, 210] = ql[128] | qh[64] | scales:int8[16] | d:f16
    dl = torch.mul(b[:, 192:208].view(torch.int8), _half(b, 208)).unsqueeze(-1)  # [n, 16, 1]
    o = out.view(-1, 16, 16)
    for s in _spans(b.shape[0], 256):
        n = o[s].shape[0]
        # Each 128-element half uses 64 ql bytes (low nibbles, then high nibbles) and 32 qh
        # bytes (four 2-bit fields), giving four 32-element groups.
        ql = (b[s, 0:128].reshape(n, 2, 1, 64) >> _NIBBLE_SHIFTS).bitwise_and_(0x0F)
        qh = (b[s, 128:192].reshape(n, 2, 1, 32) >> _CRUMB_SHIFTS).bitwise_and_(0x03)
        q = ql.view(n, 8, 32).bitwise_or_(qh.view(n, 8, 32).bitwise_left_shift_(4))
        q = q.view(torch.int8).sub_(32).view(n, 16, 16)
        torch.mul(q, dl[s], out=o[s])


# ---- unquantized types -----------------------------------------------------------------


def _f32(b: torch.Tensor, out: torch.Tensor) -> None:
    for s in _spans(b.shape[0], 1):
        out[s].copy_(b[s].view(torch.float32))  # b: [n, 4] uint8 -> [n, 1]


def _f16(b: torch.Tensor, out: torch.Tensor) -> None:
    for s in _spans(b.shape[0], 1):
        out[s].copy_(b[s].view(torch.float16))  # [n, 2] uint8 -> [n, 1]; exact in float32


def _bf16(b: torch.Tensor, out: torch.Tensor) -> None:
    for s in _spans(b.shape[0], 1):
        out[s].copy_(b[s].view(torch.bfloat16))  # [n, 2] uint8 -> [n, 1]; exact in float32


_DECODERS: dict[GGMLQuantizationType, Callable[[torch.Tensor, torch.Tensor], None]] = {
    _T.F32: _f32,
    _T.F16: _f16,
    _T.BF16: _bf16,
    _T.Q4_0: _q4_0,
    _T.Q4_1: _q4_1,
    _T.Q5_0: _q5_0,
    _T.Q5_1: _q5_1,
    _T.Q8_0: _q8_0,
    _T.Q4_K: _q4_k,
    _T.Q5_K: _q5_k,
    _T.Q6_K: _q6_k,
}

SUPPORTED: frozenset[GGMLQuantizationType] = frozenset(_DECODERS)


def _supported_names() -> str:
    return ", ".join(t.name for t in sorted(SUPPORTED, key=int))


def _resolve_type(qtype: GGMLQuantizationType | int) -> GGMLQuantizationType:
    try:
        resolved = GGMLQuantizationType(int(qtype))
    except ValueError:
        raise UnsupportedQuantError(f"unknown GGML type {qtype!r}; supported: {_supported_names()}") from None
    if resolved not in _DECODERS:
        raise UnsupportedQuantError(f"GGML type {resolved.name} is not supported; supported: {_supported_names()}")
    return resolved


def _block_bytes(
    caller: str, raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> tuple[np.ndarray, int]:
    """raw's bytes as a flat uint8 array and the number of blocks, checked against shape."""
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"{caller}: negative dimension in shape {shape}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    # Blocks never straddle rows in ggml, so the row length must be whole blocks.
    if (shape[-1] if shape else 1) % block_size != 0:
        raise ValueError(f"{caller}: {qtype.name} rows must be a multiple of {block_size} elements, got shape {shape}")
    n_blocks = math.prod(shape) // block_size
    data = np.asarray(raw)
    if not data.flags.c_contiguous:
        data = np.ascontiguousarray(data)
    data = data.reshape(-1).view(np.uint8)
    if data.size != n_blocks * type_size:
        raise ValueError(
            f"{caller}: {qtype.name} tensor of shape {shape} needs {n_blocks * type_size} bytes, got {data.size}"
        )
    return data, n_blocks


def dequantize(
    raw: np.ndarray,
    qtype: GGMLQuantizationType,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode one GGUF tensor's data into a new torch tensor of ``shape`` and ``dtype``.

    ``raw`` is ``ReaderTensor.data``: a uint8 byte array for block types, or the typed
    array for F32/F16 (any dtype works; only its bytes are read). ``shape`` is the logical
    row-major shape (GGUF's ``ne`` reversed). The result owns its memory.
    """
    qtype = _resolve_type(qtype)
    if not dtype.is_floating_point:
        raise ValueError(f"dequantize: output dtype must be floating point, got {dtype}")
    data, n_blocks = _block_bytes("dequantize", raw, qtype, shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_elements = n_blocks * block_size

    decode = _DECODERS[qtype]
    out = torch.empty(n_elements, dtype=dtype)
    out_blocks = out.view(n_blocks, block_size)
    chunk = _SPAN_ELEMENTS // block_size * _SPANS_PER_CALL
    # Decoders produce float32; other dtypes go through one reused float32 buffer and are
    # rounded once on the copy.
    direct = dtype == torch.float32
    scratch = None if direct else torch.empty(min(chunk, n_blocks), block_size)
    for start in range(0, n_blocks, chunk):
        stop = min(start + chunk, n_blocks)
        # np.array copies: the reader's array is a read-only mmap view, which torch can't
        # wrap without warning, and the copy means nothing of the mmap is retained.
        piece = np.array(data[start * type_size : stop * type_size])
        blocks = torch.from_numpy(piece).view(stop - start, type_size)
        dest = out_blocks[start:stop]
        if scratch is None:
            decode(blocks, dest)
        else:
            staged = scratch[: stop - start]
            decode(blocks, staged)
            for s in _spans(stop - start, block_size):
                dest[s].copy_(staged[s])
    return out.view(shape)


# ---- integer codes for the quantized matrix-vector product ------------------------------


class BlockCodes(NamedTuple):
    """A 2-D weight as the integer codes of its 32-element blocks, a scale and an offset per
    block: ``w[r, 32 j + i] == d[r, j] * code[r, 32 j + i] + m[r, j]`` (m None: zero). The
    codes' layouts (``bits``) are numba_kernels.cpu_qmatmul's."""

    q: torch.Tensor  # int8 [rows, cols] (bits 8) or uint8 [rows, cols / 2] (bits 4)
    d: torch.Tensor  # float32 [rows, cols / 32]
    m: torch.Tensor | None  # float32 [rows, cols / 32]
    bits: int

    def widened(self) -> BlockCodes:
        """The same weight with one byte per code (to stack with an 8-bit weight)."""
        if self.bits == 8:
            return self
        from numba_kernels import cpu_qmatmul  # the layout's owner; Numba only when needed

        q = torch.from_numpy(cpu_qmatmul.unpack(self.q.numpy(), 4).astype(np.int8))
        return BlockCodes(q, self.d, self.m, 8)


# The kernel's 4-bit order (element k with k + 8 in a byte, k < 8, and 16 + k with 24 + k) from
# the 32 codes of a block in element order.
_Q4_LOW = torch.tensor([*range(0, 8), *range(16, 24)])
_Q4_HIGH = _Q4_LOW + 8


def _pack4(q: torch.Tensor) -> torch.Tensor:
    # q: [n_blocks, 32] uint8 codes 0..15 -> [n_blocks, 16] uint8.
    return q[:, _Q4_LOW] | (q[:, _Q4_HIGH] << 4)


_Codes = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", int]


def _codes_q4_0(b: torch.Tensor) -> _Codes:
    d = _half(b, 0)
    return _pack4(_nibbles(b[:, 2:18])), d, d * -8.0, 4  # d * (q - 8); the product is exact


def _codes_q4_1(b: torch.Tensor) -> _Codes:
    dm = _half(b, 0, 2)
    return _pack4(_nibbles(b[:, 4:20])), dm[:, 0:1], dm[:, 1:2], 4


def _codes_q5_0(b: torch.Tensor) -> _Codes:
    q = _or_fifth_bits(_nibbles(b[:, 6:22]), b[:, 2:6]).view(torch.int8).sub_(16)
    return q, _half(b, 0), None, 8


def _codes_q5_1(b: torch.Tensor) -> _Codes:
    dm = _half(b, 0, 2)
    return _or_fifth_bits(_nibbles(b[:, 8:24]), b[:, 4:8]).view(torch.int8), dm[:, 0:1], dm[:, 1:2], 8


def _codes_q8_0(b: torch.Tensor) -> _Codes:
    return b[:, 2:34].view(torch.int8).clone(), _half(b, 0), None, 8


_CODES: dict[GGMLQuantizationType, Callable[[torch.Tensor], _Codes]] = {
    _T.Q4_0: _codes_q4_0,
    _T.Q4_1: _codes_q4_1,
    _T.Q5_0: _codes_q5_0,
    _T.Q5_1: _codes_q5_1,
    _T.Q8_0: _codes_q8_0,
}


def block_codes(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> BlockCodes | None:
    """The 32-element block types as `BlockCodes` (Q4_0 and Q4_1: 4-bit codes, the others
    one byte each), for a 2-D tensor; None for every other type (no such form)."""
    qtype = _resolve_type(qtype)
    codes = _CODES.get(qtype)
    if codes is None or len(shape) != 2:
        return None
    rows, cols = (int(s) for s in shape)
    data, n_blocks = _block_bytes("block_codes", raw, qtype, shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    # np.array copies out of the (read-only) mmap, as dequantize does.
    blocks = torch.from_numpy(np.array(data)).view(n_blocks, type_size)
    q, d, m, bits = codes(blocks)
    nb = cols // block_size
    return BlockCodes(q.reshape(rows, -1).contiguous(), d.reshape(rows, nb).contiguous(),
                      None if m is None else m.reshape(rows, nb).contiguous(), bits)
