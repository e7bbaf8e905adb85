"""Checkpoint loading: GGUF files (via the `gguf` package) and Hugging Face safetensors folders
(parsed here: the `safetensors` package is Rust, and the format is a JSON header plus raw bytes).

Both formats are mapped to GGUF tensor names and assembled by one function, `_assemble`, which
fuses q/k/v and gate/up. Tensors are converted one at a time, so the peak while loading is the
final weights plus about one layer.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, ModelConfigError
from .cpu_paths import CpuPaths
from .cpu_settings import CpuSettings
from .gguf_file import GGUFFile
from .llama import LayerWeights, LlamaModel, LlamaWeights, QuantWeight

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A checkpoint could not be read: missing tensors, wrong shapes, unknown format."""


@dataclass(frozen=True)
class LoadStats:
    seconds: float
    weight_bytes: int
    source: str


GetTensor = Callable[[str, torch.dtype], "torch.Tensor | None"]


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's converter interleaves the two rotary halves of each head (its RoPE pairs
    # adjacent lanes); our RoPE uses the rotate-half layout, so put the rows back.
    # w: [n_head * head_dim, ...]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The converter's permutation (inverse of `_unpermute_qk`); used by tests writing GGUFs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _assemble(
    config: ModelConfig, get: GetTensor, dtype: torch.dtype, device: torch.device, cpu: CpuSettings
) -> LlamaWeights:
    def need(name: str) -> torch.Tensor:
        t = get(name, dtype)
        if t is None:
            raise ModelLoadError(f"checkpoint lacks tensor {name}")
        return t.to(device)

    def check(t: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
        if tuple(t.shape) != shape:
            raise ModelLoadError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        return t

    c = config
    layers = []
    for i in range(c.num_layers):
        p = f"blk.{i}."
        q = check(need(p + "attn_q.weight"), (c.q_size, c.hidden_size), p + "attn_q.weight")
        k = check(need(p + "attn_k.weight"), (c.kv_size, c.hidden_size), p + "attn_k.weight")
        v = check(need(p + "attn_v.weight"), (c.kv_size, c.hidden_size), p + "attn_v.weight")
        bias = None
        if c.qkv_bias:
            bias = torch.cat([need(p + f"attn_{x}.bias") for x in "qkv"])
        gate = check(need(p + "ffn_gate.weight"), (c.intermediate_size, c.hidden_size), p + "ffn_gate.weight")
        up = check(need(p + "ffn_up.weight"), (c.intermediate_size, c.hidden_size), p + "ffn_up.weight")
        layers.append(
            LayerWeights(
                attn_norm=need(p + "attn_norm.weight"),
                qkv=torch.cat((q, k, v)),
                qkv_bias=bias,
                o=check(need(p + "attn_output.weight"), (c.hidden_size, c.q_size), p + "attn_output.weight"),
                ffn_norm=need(p + "ffn_norm.weight"),
                gate_up=torch.cat((gate, up)),
                down=check(need(p + "ffn_down.weight"), (c.hidden_size, c.intermediate_size), p + "ffn_down.weight"),
            )
        )
        del q, k, v, gate, up
    embed = check(need("token_embd.weight"), (c.vocab_size, c.hidden_size), "token_embd.weight")
    head = get("output.weight", dtype)
    lm_head = embed if head is None or c.tie_word_embeddings else head.to(device)
    factors = get("rope_freqs.weight", torch.float32)
    weights = LlamaWeights(
        embed=embed,
        layers=layers,
        norm=need("output_norm.weight"),
        lm_head=lm_head,
        rope_freq_factors=None if factors is None else factors.to(device),
    )
    CpuPaths(cpu).column_major_weights(weights)
    return weights


# ---------------------------------------------------------------------------------------- GGUF
def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse a GGUF file's header once; the loader and the tokenizer share the result."""
    try:
        return GGUFFile(path)
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc


def load_gguf(
    path: str | os.PathLike[str], dtype: torch.dtype, device: torch.device, gguf: GGUFFile | None = None,
    cpu: CpuSettings | None = None,
) -> tuple[ModelConfig, LlamaWeights]:
    cpu = cpu or CpuSettings()
    from .dequant import dequantize

    if gguf is None:
        gguf = open_gguf(path)
    tensors = gguf.tensors
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise ModelLoadError(f"{path}: no token_embd.weight tensor")
    config = ModelConfig.from_gguf_metadata(gguf.metadata, vocab_size=embd.shape[0])
    config = replace(config, tie_word_embeddings="output.weight" not in tensors)
    permute = config.architecture == "llama"

    def get(name: str, want: torch.dtype) -> torch.Tensor | None:
        t = tensors.get(name)
        if t is None:
            return None
        out = dequantize(t.data, t.qtype, t.shape, want)
        if permute and name.endswith(("attn_q.weight", "attn_q.bias")):
            out = _unpermute_qk(out, config.num_heads)
        elif permute and name.endswith(("attn_k.weight", "attn_k.bias")):
            out = _unpermute_qk(out, config.num_kv_heads)
        return out

    weights = _assemble(config, get, dtype, device, cpu)
    if dtype == torch.float32 and device.type == "cpu" and cpu.qgemv:
        _attach_block_codes(config, weights, tensors, permute)
    return config, weights


def _attach_block_codes(config: ModelConfig, weights: LlamaWeights, tensors: dict[str, Any], permute: bool) -> None:
    """Keep each linear's GGUF block codes beside its float32 copy where the checkpoint is in a
    32-element block type (CpuPaths.linear uses them for products of a few tokens). All or nothing per
    fused weight: q, k and v (or gate and up) must all have codes."""
    from .dequant import BlockCodes, block_codes

    def codes(name: str) -> BlockCodes | None:
        t = tensors.get(name)
        c = None if t is None else block_codes(t.data, t.qtype, t.shape)
        if c is None:
            return None
        if permute and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_heads if name.endswith("attn_q.weight") else config.num_kv_heads
            m = None if c.m is None else _unpermute_qk(c.m, heads)
            return BlockCodes(_unpermute_qk(c.q, heads), _unpermute_qk(c.d, heads), m, c.bits)
        return c

    def fused(*names: str) -> QuantWeight | None:
        found = [codes(n) for n in names]
        parts = [p for p in found if p is not None]
        if len(parts) < len(found):
            return None
        if len({p.bits for p in parts}) > 1:  # e.g. Q4_1 q and k with a Q8_0 v
            parts = [p.widened() for p in parts]
        q = torch.cat([p.q for p in parts])
        if q.shape[0] % 2:  # the kernel takes rows in pairs
            return None
        d = torch.cat([p.d for p in parts])
        m = None
        if any(p.m is not None for p in parts):
            m = torch.cat([torch.zeros_like(p.d) if p.m is None else p.m for p in parts]).numpy()
        # torch.cat's results are contiguous
        return QuantWeight(q.numpy(), d.numpy(), m, parts[0].bits)

    for i, lw in enumerate(weights.layers):
        p = f"blk.{i}."
        lw.qkv_q = fused(p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight")
        lw.o_q = fused(p + "attn_output.weight")
        lw.gate_up_q = fused(p + "ffn_gate.weight", p + "ffn_up.weight")
        lw.down_q = fused(p + "ffn_down.weight")
    head = "token_embd.weight" if weights.lm_head is weights.embed else "output.weight"
    weights.lm_head_q = fused(head)


# --------------------------------------------------------------------------------- safetensors
_ST_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}

_HF_NAMES = [
    (re.compile(r"^model\.embed_tokens\.weight$"), "token_embd.weight"),
    (re.compile(r"^model\.norm\.weight$"), "output_norm.weight"),
    (re.compile(r"^lm_head\.weight$"), "output.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.input_layernorm\.weight$"), r"blk.\1.attn_norm.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$"), r"blk.\1.ffn_norm.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$"), r"blk.\1.attn_\2.\3"),
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\.o_proj\.weight$"), r"blk.\1.attn_output.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$"), r"blk.\1.ffn_\2.weight"),
]


def _gguf_name(hf_name: str) -> str | None:
    for pattern, repl in _HF_NAMES:
        if pattern.match(hf_name):
            return pattern.sub(repl, hf_name)
    return None


class SafetensorsFile:
    """A read-only view of one .safetensors file: an 8-byte little-endian header length, a JSON
    header {name: {dtype, shape, data_offsets}}, then the raw tensor bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ModelLoadError(f"{path}: implausible safetensors header length {n}")
            header = json.loads(f.read(n))
            # ACCESS_COPY gives a writable view (torch.frombuffer wants one) without touching the file.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._base = 8 + n
        header.pop("__metadata__", None)
        self.header: dict[str, dict[str, Any]] = header

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        info = self.header[name]
        st_dtype = _ST_DTYPES.get(info["dtype"])
        if st_dtype is None:
            raise ModelLoadError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        count = (end - start) // torch.empty((), dtype=st_dtype).element_size()
        raw = torch.frombuffer(self._map, dtype=st_dtype, count=count, offset=self._base + start)
        # .to() copies when the dtype changes; clone otherwise so nothing keeps the map alive.
        out = raw.to(dtype) if st_dtype != dtype else raw.clone()
        return out.reshape(info["shape"])


def load_hf_dir(
    path: str | os.PathLike[str], dtype: torch.dtype, device: torch.device, cpu: CpuSettings | None = None
) -> tuple[ModelConfig, LlamaWeights]:
    root = Path(path)
    try:
        config = ModelConfig.from_hf_config(json.loads((root / "config.json").read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{root}: cannot read config.json ({exc})") from exc
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{root}: no *.safetensors files")
    index: dict[str, tuple[SafetensorsFile, str]] = {}
    for fpath in files:
        st = SafetensorsFile(fpath)
        for name in st.header:
            g = _gguf_name(name)
            if g is not None:
                index[g] = (st, name)

    def get(name: str, want: torch.dtype) -> torch.Tensor | None:
        hit = index.get(name)
        return None if hit is None else hit[0].tensor(hit[1], want)

    return config, _assemble(config, get, dtype, device, cpu or CpuSettings())


def load_model(
    path: str | os.PathLike[str],
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    *,
    gguf: GGUFFile | None = None,
    cpu: CpuSettings | None = None,
) -> tuple[LlamaModel, LoadStats]:
    """A .gguf file (optionally already opened with `open_gguf`) or a Hugging Face folder →
    a ready model, with how long it took. `cpu`: how it runs on a CPU (default settings when
    None)."""
    cpu = cpu or CpuSettings()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelConfigError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    dev = torch.device(device)
    p = Path(path)
    t0 = time.perf_counter()
    if p.is_dir():
        config, weights = load_hf_dir(p, dtype, dev, cpu)
    elif p.is_file():
        config, weights = load_gguf(p, dtype, dev, gguf, cpu)
    else:
        raise ModelLoadError(f"{p}: no such model file or folder")
    model = LlamaModel(config, weights, cpu)
    stats = LoadStats(time.perf_counter() - t0, weights.num_bytes(), str(p))
    log.info(
        "loaded %s (%s, %d layers, %.1f MB of %s weights) in %.2f s",
        p.name,
        config.architecture,
        config.num_layers,
        stats.weight_bytes / 1e6,
        str(dtype).removeprefix("torch."),
        stats.seconds,
    )
    return model, stats


__all__ = ["LoadStats", "ModelLoadError", "load_gguf", "load_hf_dir", "load_model", "open_gguf"]
