"""The Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2) as plain functions of tensors.

The forward takes a *flat* batch: the new tokens of every scheduled sequence concatenated, each
with its explicit position. Attention is the only place where sequence boundaries matter, so it is
handed in as a callable bound to the step's metadata (`Attend`): the reference contiguous cache
below today, the paged cache and Numba kernels later. No global attention context.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Protocol

import numba
import numpy as np
import torch
import torch.nn.functional as F

from numba_kernels import cpu_decode, cpu_ops, cpu_qmatmul

from .config import ModelConfig


class Attend(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] (post-RoPE) →
        out: [T, num_heads, head_dim]. Stores k/v for later steps as a side effect."""
        ...


@dataclass
class QuantWeight:
    """A [out, in] weight kept as GGUF block codes besides its float copy: W[r, 32j + i] =
    d[r, j] * code[r, 32j + i] + m[r, j] exactly, the codes in numba_kernels.cpu_qmatmul's
    ``bits`` layout."""

    q: np.ndarray  # int8 [out, in] (bits 8) or uint8 [out, in / 2] (bits 4)
    d: np.ndarray  # float32 [out, in / 32]
    m: np.ndarray | None  # float32 [out, in / 32]; None: no offsets
    bits: int

    def num_bytes(self) -> int:
        return int(self.q.nbytes + self.d.nbytes + (0 if self.m is None else self.m.nbytes))


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]: q, k, v stacked so one matmul serves all three
    qkv_bias: torch.Tensor | None  # [q_size + 2 * kv_size] (Qwen2)
    o: torch.Tensor  # [hidden, q_size]
    ffn_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate rows first, then up
    down: torch.Tensor  # [hidden, intermediate]
    # The same weights as block codes, where the checkpoint has them (CPU float32 models): one
    # token's products read 4x fewer bytes (see `linear`).
    qkv_q: QuantWeight | None = None
    o_q: QuantWeight | None = None
    gate_up_q: QuantWeight | None = None
    down_q: QuantWeight | None = None


@dataclass
class LlamaWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the same tensor as `embed` when tied
    rope_freq_factors: torch.Tensor | None = None  # [rope_dim / 2] divisors (GGUF rope_freqs, llama3)
    lm_head_q: QuantWeight | None = None  # lm_head as block codes (see LayerWeights.qkv_q)

    def num_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for t in self.tensors():
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total + sum(qw.num_bytes() for qw in self.quant_weights())

    def quant_weights(self) -> list[QuantWeight]:
        out = [] if self.lm_head_q is None else [self.lm_head_q]
        for lw in self.layers:
            out += [qw for qw in (lw.qkv_q, lw.o_q, lw.gate_up_q, lw.down_q) if qw is not None]
        return out

    def tensors(self) -> list[torch.Tensor]:
        out = [self.embed, self.norm, self.lm_head]
        if self.rope_freq_factors is not None:
            out.append(self.rope_freq_factors)
        for lw in self.layers:
            out += [lw.attn_norm, lw.qkv, lw.o, lw.ffn_norm, lw.gate_up, lw.down]
            if lw.qkv_bias is not None:
                out.append(lw.qkv_bias)
        return out


def rope_inv_freq(config: ModelConfig, freq_factors: torch.Tensor | None) -> torch.Tensor:
    """[rope_dim / 2] float32 inverse frequencies, with the checkpoint's scaling applied."""
    d = config.rope_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if freq_factors is not None:
        # llama.cpp stores llama3 scaling as per-frequency divisors of the base frequency.
        return inv / freq_factors.float()
    s = config.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return inv / s.factor
    # llama3: long wavelengths slowed by `factor`, short ones untouched, a smooth ramp between
    # (the same formula as transformers' _compute_llama3_parameters).
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


# float32 matmuls on the CPU go through NumPy's BLAS (OpenBLAS in NumPy's wheels) instead of
# torch's (MKL, which takes a generic path on AMD CPUs): on this project's AMD EPYC hosts
# OpenBLAS ran the model's linears 1.2–2.9× faster from 1 to 512 tokens, about even at 2048
# (`python benchmarks/matmul_backend.py`).
# INFLIGHTD_CPU_MATMUL=torch keeps torch's, for comparison.
CPU_MATMUL = os.environ.get("INFLIGHTD_CPU_MATMUL", "numpy")
if CPU_MATMUL not in ("numpy", "torch"):
    raise ValueError(f"INFLIGHTD_CPU_MATMUL must be 'numpy' or 'torch', got {CPU_MATMUL!r}")


# NumPy's BLAS runs x @ w.T up to ~50 % faster at 8-64 tokens (about even from 512; slower at
# one token, which the block codes serve) when w.T is the contiguous array, i.e. w [out, in]
# stored column-major (`python benchmarks/matmul_backend.py`, "numpy cols" column).
# `column_major_weights` stores CPU float32 linears that way once at load; the tensors keep
# their [out, in] shapes, so nothing else changes. INFLIGHTD_CPU_COLUMN_WEIGHTS=0 keeps rows.
CPU_COLUMN_WEIGHTS = os.environ.get("INFLIGHTD_CPU_COLUMN_WEIGHTS", "1") != "0"


def _column_major(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous().t()


def column_major_weights(weights: LlamaWeights) -> None:
    """Store each linear of a CPU float32 model column-major for NumPy's BLAS (see above). The
    tied embedding goes too: its lookups become strided gathers (`benchmarks/matmul_backend.py`:
    ~9 ms for a 2,048-token prefill chunk, ~0.1 ms for 32 decodes), cheaper than the vocab
    projection they speed up."""
    if CPU_MATMUL != "numpy" or not CPU_COLUMN_WEIGHTS or weights.embed.device.type != "cpu":
        return
    if weights.embed.dtype != torch.float32:
        return
    for lw in weights.layers:
        lw.qkv, lw.o = _column_major(lw.qkv), _column_major(lw.o)
        lw.gate_up, lw.down = _column_major(lw.gate_up), _column_major(lw.down)
    tied = weights.lm_head is weights.embed
    weights.lm_head = _column_major(weights.lm_head)
    if tied:
        weights.embed = weights.lm_head


# Products of up to QGEMM_MAX_TOKENS tokens against weights kept as block codes:
# `numba_kernels.cpu_qmatmul` reads ~1 byte per weight instead of 4, once for all the tokens
# (such steps are bound by memory bandwidth, and OpenBLAS is at its least efficient on 2-8 rows:
# `python benchmarks/qgemv.py --tokens ...`). Larger batches are bound by arithmetic, where
# float32 BLAS is faster. INFLIGHTD_CPU_QGEMV=0 keeps float32 BLAS for all, for comparison;
# INFLIGHTD_CPU_QGEMM_MAX_TOKENS moves the crossover (1: codes for one token only).
CPU_QGEMV = os.environ.get("INFLIGHTD_CPU_QGEMV", "1") != "0"
_max_tokens = os.environ.get("INFLIGHTD_CPU_QGEMM_MAX_TOKENS", "16")
if not _max_tokens.isdigit():
    raise ValueError(f"INFLIGHTD_CPU_QGEMM_MAX_TOKENS must be a whole number of tokens, got {_max_tokens!r}")
QGEMM_MAX_TOKENS = int(_max_tokens)
_QGEMV_CHUNKS: list[int] = []


def _num_threads() -> int:
    """Numba's pool size (fixed once the pool exists), remembered: the call costs ~2 µs."""
    if not _QGEMV_CHUNKS:
        _QGEMV_CHUNKS.append(numba.get_num_threads())
    return _QGEMV_CHUNKS[0]


def _qgemm(x: torch.Tensor, wq: QuantWeight) -> torch.Tensor:
    xv = np.ascontiguousarray(x.numpy())
    return torch.from_numpy(cpu_qmatmul.qgemm(xv, wq.q, wq.d, wq.m, wq.bits, _num_threads()))


def uses_codes(num_tokens: int) -> bool:
    """Whether a float32 CPU step of this many tokens multiplies from the block codes (where the
    model has them): its products are then Numba parallel regions, not OpenBLAS calls."""
    return CPU_QGEMV and num_tokens <= QGEMM_MAX_TOKENS


def linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, wq: QuantWeight | None = None
) -> torch.Tensor:
    # x: [T, in]; w: [out, in]; bias: [out]; wq: w as block codes, if kept → [T, out] (F.linear).
    if wq is not None and uses_codes(x.shape[0]) and _fused(x):
        out = _qgemm(x, wq)
        return out if bias is None else out.add_(bias)
    if CPU_MATMUL == "numpy" and x.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad:
        out = torch.from_numpy(np.matmul(x.numpy(), w.numpy().T))
        return out if bias is None else out.add_(bias)
    return F.linear(x, w, bias)


# float32 batches of up to this many tokens on the CPU run RMSNorm and RoPE as one Numba call
# each (numba_kernels.cpu_ops: torch's chains of small ops were 14 % of a one-sequence decode
# step); larger batches keep torch's multi-threaded ops.
FUSED_MAX_TOKENS = 64


def _fused(x: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
            and x.shape[0] <= FUSED_MAX_TOKENS and not x.requires_grad)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, hidden]. Statistics in float32 whatever the model dtype, as the reference does.
    if _fused(x) and weight.dtype == torch.float32:
        return torch.from_numpy(cpu_ops.rms_norm(x.numpy(), weight.numpy(), eps))
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, head_dim]; cos, sin: [T, 1, rope_dim] (rotate-half layout, Hugging Face order).
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    x1, x2 = rot[..., : d // 2], rot[..., d // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = rot * cos + rotated * sin
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


class LlamaModel:
    """Weights plus the forward pass. Stateless between calls: all cache state lives behind
    the `Attend` callable."""

    def __init__(self, config: ModelConfig, weights: LlamaWeights) -> None:
        self.config = config
        self.weights = weights
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.inv_freq = rope_inv_freq(config, weights.rope_freq_factors).to(self.device)
        self._layer_args: list[tuple[np.ndarray, np.ndarray, tuple[object, ...]]] | None = None

    def one_token_layers(self) -> bool:
        """Whether `decode_tokens` can run: float32 on the CPU, every linear of every layer kept
        as block codes, no q/k/v bias (the fused layer has none)."""
        if self.device.type != "cpu":
            return False
        if self._layer_args is None:
            args: list[tuple[np.ndarray, np.ndarray, tuple[object, ...]]] = []
            for lw in self.weights.layers:
                qws = (lw.qkv_q, lw.o_q, lw.gate_up_q, lw.down_q)
                if lw.qkv_bias is not None or any(qw is None for qw in qws) or lw.attn_norm.dtype != torch.float32:
                    args = []
                    break
                flat: list[object] = []
                for qw in qws:
                    assert qw is not None
                    flat += [qw.q, qw.d, qw.d if qw.m is None else qw.m, qw.m is not None, qw.bits]
                args.append((lw.attn_norm.numpy(), lw.ffn_norm.numpy(), tuple(flat)))
            self._layer_args = args
        return bool(self._layer_args)

    def warm_decode_tokens(self) -> None:
        """Compile (or load from Numba's cache) the one-call layer for this model's weight types,
        with a one-block scratch cache: otherwise the first one-token step would."""
        if not self.one_token_layers():
            return
        cfg, block = self.config, 16
        caches = [(np.zeros((block * cfg.num_kv_heads, cfg.head_dim), np.float32),) * 2] * cfg.num_layers
        zero = torch.zeros(1, dtype=torch.int64)
        self.decode_tokens(zero, zero, caches, np.zeros(1, np.int64), np.zeros((1, 1), np.int32),
                           np.ones(1, np.int32), np.arange(2, dtype=np.int32), block)

    @torch.inference_mode()
    def decode_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      caches: list[tuple[np.ndarray, np.ndarray]], slot_mapping: np.ndarray,
                      block_tables: np.ndarray, context_lens: np.ndarray, query_start_loc: np.ndarray,
                      block_size: int, serial_work: int = cpu_decode.DECODE_SERIAL_WORK) -> torch.Tensor:
        """`forward` for the one new token of each of T sequences (when `one_token_layers()`;
        products from the codes, so T up to QGEMM_MAX_TOKENS pays), each layer one Numba call
        (numba_kernels.cpu_decode) → hidden states [T, hidden] after the final norm.
        input_ids, positions: [T] int64, as for `forward`; caches: per layer, the K and V caches
        as [num_slots * num_kv_heads, head_dim] arrays; the rest is the step's paged metadata
        as arrays (PagedStep's fields) and attention's serial threshold (cpu_decode.layer)."""
        cfg, w = self.config, self.weights
        assert self._layer_args
        h = np.ascontiguousarray(F.embedding(input_ids, w.embed).numpy())
        cos, sin = self.rope_tables(positions)
        n = input_ids.shape[0]
        cos_np, sin_np = cos.reshape(n, -1).numpy(), sin.reshape(n, -1).numpy()
        for (attn_norm, ffn_norm, qws), (kc, vc) in zip(self._layer_args, caches):
            cpu_decode.layer(h, attn_norm, ffn_norm, cfg.rms_norm_eps, qws, cos_np, sin_np, cfg.num_heads,
                             cfg.num_kv_heads, kc, vc, slot_mapping, block_tables, context_lens,
                             query_start_loc, block_size, cfg.attn_scale, _num_threads(), serial_work)
        return rms_norm(torch.from_numpy(h), w.norm, cfg.rms_norm_eps)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] int64 → cos, sin: [T, 1, rope_dim] in the model dtype.
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        # input_ids, positions: [T] int64 → hidden states [T, hidden] after the final norm.
        cfg, w = self.config, self.weights
        T = input_ids.shape[0]
        cos, sin = self.rope_tables(positions)
        h = F.embedding(input_ids, w.embed)
        # Few float32 tokens on the CPU: RoPE in place on q and k of the fused projection, one
        # call per layer (bit-identical to apply_rope).
        fused = _fused(h)
        if fused:
            cos_np, sin_np = cos.reshape(T, -1).numpy(), sin.reshape(T, -1).numpy()
        for i, lw in enumerate(w.layers):
            x = rms_norm(h, lw.attn_norm, cfg.rms_norm_eps)
            qkv = linear(x, lw.qkv, lw.qkv_bias, lw.qkv_q)
            if fused:
                cpu_ops.rope_(qkv.numpy(), cos_np, sin_np, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
            q, k, v = qkv.split((cfg.q_size, cfg.kv_size, cfg.kv_size), dim=-1)
            if fused:
                q = q.reshape(T, cfg.num_heads, cfg.head_dim).contiguous()
                k = k.view(T, cfg.num_kv_heads, cfg.head_dim)
            else:
                q = apply_rope(q.view(T, cfg.num_heads, cfg.head_dim), cos, sin)
                k = apply_rope(k.view(T, cfg.num_kv_heads, cfg.head_dim), cos, sin)
            v = v.view(T, cfg.num_kv_heads, cfg.head_dim)
            a = attend(i, q, k, v)
            h = h + linear(a.reshape(T, cfg.q_size), lw.o, wq=lw.o_q)
            x = rms_norm(h, lw.ffn_norm, cfg.rms_norm_eps)
            gate, up = linear(x, lw.gate_up, wq=lw.gate_up_q).chunk(2, dim=-1)
            h = h + linear(F.silu(gate) * up, lw.down, wq=lw.down_q)
        return rms_norm(h, w.norm, cfg.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] → [N, vocab] float32. Callers pass only the rows they sample from:
        # the vocab projection is the largest matmul of a step.
        return linear(hidden, self.weights.lm_head, wq=self.weights.lm_head_q).float()


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
