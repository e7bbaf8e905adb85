"""Loading the default model: the memory bound (peak while loading ≤ 2× the final weights),
dtype handling, and clear errors for what cannot be loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inflightd.models.config import ModelConfigError
from inflightd.models.loader import ModelLoadError, load_model

pytestmark = pytest.mark.slow  # loads the default model

MEASURE = r"""
import json, sys
import psutil, torch
from inflightd.runtime.paged_cache import peak_rss
from inflightd.models.loader import load_model
base = psutil.Process().memory_info().rss
model, stats = load_model(sys.argv[1], sys.argv[2])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so the child would report the
# (much larger) pytest process's peak.
print(json.dumps({"extra": peak_rss() - base, "weights": stats.weight_bytes, "dtype": str(model.dtype)}))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_peak_memory_within_twice_the_weights(default_gguf: Path, dtype: str) -> None:
    # A fresh process, so that ru_maxrss is this load's peak and nothing else's.
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(default_gguf), dtype], check=True, capture_output=True, text=True
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["dtype"] == f"torch.{dtype}"
    assert r["extra"] <= 2 * r["weights"], r


def test_unknown_dtype_is_refused(default_gguf: Path) -> None:
    with pytest.raises(ModelConfigError, match="float64"):
        load_model(default_gguf, "float64")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        load_model(bad, "float32")


def test_hf_folder_with_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ModelConfigError, match="gpt_neox"):
        load_model(tmp_path, "float32")


def test_bfloat16_weights_are_bfloat16(default_gguf: Path) -> None:
    model, stats = load_model(default_gguf, "bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in model.weights.tensors() if t is not model.weights.rope_freq_factors)
    assert stats.weight_bytes == sum(t.numel() * 2 for t in {id(t): t for t in model.weights.tensors()}.values())


def test_float32_linears_are_stored_column_major(default_gguf: Path) -> None:
    # NumPy's BLAS is faster on column-major weights at decode batch sizes; the values, shapes
    # and the embedding tie must be exactly those of the row-major load.
    from inflightd.models.cpu_settings import CpuSettings

    model, _ = load_model(default_gguf, "float32")
    rows, _ = load_model(default_gguf, "float32", cpu=CpuSettings(column_weights=False))
    w, r = model.weights, rows.weights
    assert w.lm_head is w.embed and r.lm_head is r.embed
    linears = [(lw.qkv, rw.qkv) for lw, rw in zip(w.layers, r.layers)]
    linears += [(lw.down, rw.down) for lw, rw in zip(w.layers, r.layers)] + [(w.lm_head, r.lm_head)]
    for a, b in linears:
        assert a.t().is_contiguous() and not a.is_contiguous() and b.is_contiguous()
        assert a.shape == b.shape and torch.equal(a, b)
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(8, model.config.hidden_size, generator=gen)
    ref = hidden.double() @ r.lm_head.double().T
    out = model.logits(hidden)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    ids = torch.randint(0, model.config.vocab_size, (5,), generator=gen)
    assert torch.equal(torch.nn.functional.embedding(ids, w.embed), r.embed[ids])
