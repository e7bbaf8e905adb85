"""The Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2) as plain functions of tensors.

The forward takes a *flat* batch: the new tokens of every scheduled sequence concatenated, each
with its explicit position. Attention is the only place where sequence boundaries matter, so it is
handed in as a callable bound to the step's metadata (`Attend`): the paged cache and Numba
kernels (`inflightd.runtime.paged_cache`), or the contiguous reference (`reference_cache`). No
global attention context. Which path serves each product on a CPU is `CpuSettings`'s choice (`cpu_paths`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from numba_kernels import cpu_decode, cpu_ops

from .config import ModelConfig
from .cpu_paths import CpuPaths, num_threads
from .cpu_settings import CpuSettings


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

    def __init__(self, config: ModelConfig, weights: LlamaWeights, cpu: CpuSettings | None = None) -> None:
        self.config = config
        self.weights = weights
        self.cpu = cpu or CpuSettings()  # which path serves each op on a CPU
        self.ops = CpuPaths(self.cpu)
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
                      block_size: int) -> torch.Tensor:
        """`forward` for the one new token of each of T sequences (when `one_token_layers()`;
        products from the codes, so T up to `cpu.qgemm_max_tokens` pays), each layer one Numba call
        (numba_kernels.cpu_decode) → hidden states [T, hidden] after the final norm.
        input_ids, positions: [T] int64, as for `forward`; caches: per layer, the K and V caches
        as [num_slots * num_kv_heads, head_dim] arrays; the rest is the step's paged metadata
        as arrays (PagedStep's fields); attention splits over the pool beyond
        `cpu.decode_serial_work` context positions."""
        cfg, w = self.config, self.weights
        assert self._layer_args
        h = np.ascontiguousarray(F.embedding(input_ids, w.embed).numpy())
        cos, sin = self.rope_tables(positions)
        n = input_ids.shape[0]
        cos_np, sin_np = cos.reshape(n, -1).numpy(), sin.reshape(n, -1).numpy()
        for (attn_norm, ffn_norm, qws), (kc, vc) in zip(self._layer_args, caches):
            cpu_decode.layer(h, attn_norm, ffn_norm, cfg.rms_norm_eps, qws, cos_np, sin_np, cfg.num_heads,
                             cfg.num_kv_heads, kc, vc, slot_mapping, block_tables, context_lens,
                             query_start_loc, block_size, cfg.attn_scale, num_threads(),
                             self.cpu.decode_serial_work)
        return self.ops.rms_norm(torch.from_numpy(h), w.norm, cfg.rms_norm_eps)

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
        ops = self.ops
        fused = ops.fused(h)
        if fused:
            cos_np, sin_np = cos.reshape(T, -1).numpy(), sin.reshape(T, -1).numpy()
        for i, lw in enumerate(w.layers):
            x = ops.rms_norm(h, lw.attn_norm, cfg.rms_norm_eps)
            qkv = ops.linear(x, lw.qkv, lw.qkv_bias, lw.qkv_q)
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
            h = h + ops.linear(a.reshape(T, cfg.q_size), lw.o, wq=lw.o_q)
            x = ops.rms_norm(h, lw.ffn_norm, cfg.rms_norm_eps)
            gate, up = ops.linear(x, lw.gate_up, wq=lw.gate_up_q).chunk(2, dim=-1)
            h = h + ops.linear(F.silu(gate) * up, lw.down, wq=lw.down_q)
        return ops.rms_norm(h, w.norm, cfg.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] → [N, vocab] float32. Callers pass only the rows they sample from:
        # the vocab projection is the largest matmul of a step.
        return self.ops.linear(hidden, self.weights.lm_head, wq=self.weights.lm_head_q).float()
