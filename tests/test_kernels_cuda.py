"""CUDA kernels (numba_kernels.cuda) without a GPU: correctness in Numba's CUDA simulator, and every
kernel compiled to PTX for cc 9.0 with each of its explicit signatures.

Why subprocesses: `NUMBA_ENABLE_CUDASIM` is read once, when numba.cuda is first imported, and it
replaces `numba.cuda` process-wide. Other test files import numba (and numba_kernels) in this same
pytest process without the simulator, and compile_ptx needs the simulator *off*. So this file
runs itself twice as a script: `python test_kernels_cuda.py sim` (simulator on, tiny launch
config, `sys.setswitchinterval(5e-4)` because the simulator runs each CUDA thread as a Python
thread and syncthreads-heavy kernels spend their time in GIL hand-offs) and
`python test_kernels_cuda.py ptx` (simulator off). Both start at the first test that needs
either, run in parallel, and report one JSON line; each case is then its own pytest test.
The PTX check needs NVVM (`pip install '.[cuda13]'`): without it the test fails, saying so.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
_procs: dict[str, subprocess.Popen] = {}
_results: dict[str, dict[str, Any]] = {}


# --------------------------------------------------------------------------------------------
# Cases, run inside the simulator subprocess (imports are local: the parent must not import
# numba.cuda on their account).

def _tiny() -> Any:
    from numba_kernels.cuda import LaunchConfig
    return LaunchConfig(threads=32, partition=32, tile=8)  # tile*D % (4*threads) == 0 for D % 16 == 0


def _attention_case(query_lens: list[int], context_lens: list[int], *, heads: int, kv_heads: int,
                    head_dim: int, block_size: int, dtype: str = "float32", decode: bool = True,
                    max_context_len: int | None = None, seed: int = 0) -> tuple[float, str]:
    import numpy as np
    import torch
    from paged_reference import random_case, reference_attention, rel_err

    from numba_kernels import cuda as kc

    dt = getattr(torch, dtype)
    c = random_case(np.random.default_rng(seed), query_lens, context_lens, num_heads=heads,
                    num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, dtype=dt)
    out = torch.full_like(c.q, float("nan"))  # poisoned: an unwritten element shows
    cfg = _tiny()
    bound = max_context_len if max_context_len is not None else c.block_tables.shape[1] * block_size
    path = "v1" if bound <= cfg.partition else "v2"
    if decode:
        kc.paged_attention_decode(out, c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens,
                                  c.scale, max_context_len=max_context_len, config=cfg)
    else:
        kc.paged_attention_prefill(out, c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens,
                                   c.query_start_loc, c.scale, max_context_len=max_context_len,
                                   config=cfg)
    ref = reference_attention(c)
    assert not out.isnan().any(), f"{int(out.isnan().sum())} NaN outputs (unwritten?)"
    return rel_err(out, ref), path


def _write_case(dtype: str) -> tuple[float, str]:
    import numpy as np
    import torch
    from paged_reference import reference_write

    from numba_kernels import cuda as kc

    rng = np.random.default_rng(1)
    dt = getattr(torch, dtype)
    shape = (4, 8, 2, 16)
    k = torch.from_numpy(rng.standard_normal(shape)).to(dt)
    v = torch.from_numpy(rng.standard_normal(shape)).to(dt)
    key = torch.from_numpy(rng.standard_normal((6, 2, 16))).to(dt)
    value = torch.from_numpy(rng.standard_normal((6, 2, 16))).to(dt)
    slots = torch.tensor([5, -1, 17, 8, -1, 31], dtype=torch.int64)
    rk, rv = reference_write(key, value, k, v, slots)
    kc.write_kv_cache(key, value, k, v, slots, config=_tiny())
    # bit-exact: a copy, whatever the dtype
    same = torch.equal(k.view(torch.int16 if dt != torch.float32 else torch.int32),
                       rk.view(torch.int16 if dt != torch.float32 else torch.int32)) and torch.equal(
        v.view(torch.int16 if dt != torch.float32 else torch.int32),
        rv.view(torch.int16 if dt != torch.float32 else torch.int32))
    return (0.0 if same else 1.0), "copy"


def _copy_case(dtype: str) -> tuple[float, str]:
    import numpy as np
    import torch

    from numba_kernels import cuda as kc

    rng = np.random.default_rng(2)
    dt = getattr(torch, dtype)
    k = torch.from_numpy(rng.standard_normal((5, 8, 2, 16))).to(dt)
    v = torch.from_numpy(rng.standard_normal((5, 8, 2, 16))).to(dt)
    src, dst = torch.tensor([0, 2], dtype=torch.int64), torch.tensor([3, 1], dtype=torch.int64)
    rk, rv = k.clone(), v.clone()
    rk[dst], rv[dst] = k[src], v[src]
    kc.copy_blocks(k, v, src, dst, config=_tiny())
    return (0.0 if torch.equal(k, rk) and torch.equal(v, rv) else 1.0), "copy"


def _bf16_rounding_case() -> tuple[float, str]:
    """The simulator's float32 -> bf16 bits (the intrinsic's Python twin) against torch."""
    import numpy as np
    import torch

    from numba_kernels.cuda_kernels import from_f32, to_f32

    vals = np.array([1.0, -2.5, 1 + 2**-8, 1 + 3 * 2**-8, 3.0e38, 1e-40, np.inf, -0.0, 0.1, 1/3],
                    dtype=np.float32)
    like = np.zeros(1, dtype=np.int16)
    ours = np.array([from_f32(x, like) for x in vals], dtype=np.int16)
    theirs = torch.from_numpy(vals).to(torch.bfloat16).view(torch.int16).numpy()
    back = np.array([to_f32(b) for b in ours], dtype=np.float32)
    ok = np.array_equal(ours, theirs) and np.array_equal(
        back, torch.from_numpy(theirs).view(torch.bfloat16).float().numpy())
    return (0.0 if ok else 1.0), "bits"


def _llm_warmup_case() -> tuple[float, str]:
    """The daemon's start-up warms the kernels of the model's device: for a float16 CUDA model
    that is every CUDA kernel in float16 (it used to warm the CPU kernels, which have no
    float16, and failed start-up)."""
    import torch

    from inflightd.llm import warm_kernels
    from numba_kernels import cuda as kc
    from numba_kernels.cuda_kernels import KERNELS

    class GpuModel:  # what warm_kernels reads of a LlamaModel loaded on a GPU
        dtype = torch.float16
        device = torch.device("cuda")

        def warm_decode_tokens(self) -> None:  # LlamaModel's is a no-op off the CPU
            pass

    warm_kernels(GpuModel())  # type: ignore[arg-type]
    missing = [k for k in KERNELS if (k, "float16") not in kc._dispatchers]
    return float(len(missing)), f"missing {missing}"


F32 = 1e-5
# name -> (thunk, tolerance on the relative error)
CASES: dict[str, tuple[Callable[[], tuple[float, str]], float]] = {
    "write_kv_float32": (lambda: _write_case("float32"), 0.0),
    "write_kv_float16": (lambda: _write_case("float16"), 0.0),
    "write_kv_bfloat16": (lambda: _write_case("bfloat16"), 0.0),
    "copy_blocks_float32": (lambda: _copy_case("float32"), 0.0),
    "copy_blocks_bfloat16": (lambda: _copy_case("bfloat16"), 0.0),
    "bf16_round_trip": (_bf16_rounding_case, 0.0),
    "llm_warmup_float16_cuda": (_llm_warmup_case, 0.0),
    # MHA; contexts odd, exactly one block, one past a block boundary; v1 (one partition)
    "decode_mha_block_edges_v1": (lambda: _attention_case(
        [1, 1, 1, 1], [7, 8, 9, 17], heads=2, kv_heads=2, head_dim=16, block_size=8), F32),
    # GQA 4 with head_dim 64, one partition exactly full (32 = partition)
    "decode_gqa4_d64_v1": (lambda: _attention_case(
        [1, 1], [9, 32], heads=4, kv_heads=1, head_dim=64, block_size=16, max_context_len=32), F32),
    # split context: 3 partitions + combine; a sequence that ends in its first partition
    "decode_gqa2_split_v2": (lambda: _attention_case(
        [1, 1, 1], [70, 33, 5], heads=4, kv_heads=2, head_dim=16, block_size=8), F32),
    # chunks after a cached prefix, an empty chunk (n_i = 0), a 1-token sequence; split path
    "prefill_cached_prefix_v2": (lambda: _attention_case(
        [3, 0, 2, 1], [10, 5, 40, 1], heads=2, kv_heads=1, head_dim=16, block_size=8,
        decode=False), F32),
    # a whole prompt (no prefix) and a chunk after a prefix, GQA 8, block 32; v1
    "prefill_gqa8_v1": (lambda: _attention_case(
        [4, 2], [4, 20], heads=8, kv_heads=1, head_dim=16, block_size=32, decode=False,
        max_context_len=20), F32),
    "decode_float16_v2": (lambda: _attention_case(
        [1, 1], [37, 6], heads=2, kv_heads=1, head_dim=16, block_size=16, dtype="float16"), 2e-3),
    "decode_bfloat16_v2": (lambda: _attention_case(
        [1, 1], [37, 6], heads=2, kv_heads=1, head_dim=16, block_size=16, dtype="bfloat16"), 1e-2),
}


def _main_sim() -> dict[str, Any]:
    sys.setswitchinterval(5e-4)
    sys.path.insert(0, str(HERE))
    res: dict[str, Any] = {}
    for name, (thunk, tol) in CASES.items():
        try:
            err, path = thunk()
            res[name] = {"err": err, "tol": tol, "path": path}
        except Exception:  # reported per case by the parent
            res[name] = {"error": traceback.format_exc()}
    return res


def _main_ptx() -> dict[str, Any]:
    from numba import cuda

    from numba_kernels.cuda_kernels import ELEMENT_TYPES, KERNELS, SIMULATOR, signature

    assert not SIMULATOR
    res: dict[str, Any] = {}
    for kernel, fn in KERNELS.items():
        for dtype in ELEMENT_TYPES:
            try:
                ptx, _ = cuda.compile_ptx(fn, signature(kernel, dtype), cc=(9, 0))
                res[f"{kernel}-{dtype}"] = {"ok": ".entry" in ptx}
            except Exception:
                res[f"{kernel}-{dtype}"] = {"error": traceback.format_exc()}
    return res


# --------------------------------------------------------------------------------------------
# The pytest side.

def _start() -> None:
    if _procs:
        return
    for mode in ("sim", "ptx"):
        env = dict(os.environ)
        env.pop("NUMBA_ENABLE_CUDASIM", None)
        if mode == "sim":
            env["NUMBA_ENABLE_CUDASIM"] = "1"
        _procs[mode] = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), mode],
                                        env=env, cwd=str(HERE.parent), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)


def _result(mode: str) -> dict[str, Any]:
    if mode not in _results:
        _start()
        out, err = _procs[mode].communicate(timeout=300)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if _procs[mode].returncode != 0 or not lines:
            pytest.fail(f"`{mode}` subprocess failed (rc {_procs[mode].returncode}):\n{err[-4000:]}")
        _results[mode] = json.loads(lines[-1])
    return _results[mode]


@pytest.mark.parametrize("case", list(CASES))
def test_simulator(case: str) -> None:
    r = _result("sim")[case]
    assert "error" not in r, r.get("error")
    assert r["err"] <= r["tol"], f"{case} ({r['path']}): rel err {r['err']:.3g} > {r['tol']}"


def test_compile_ptx_cc90() -> None:
    res = _result("ptx")
    if "nvvm_missing" in res:
        pytest.fail("NVVM not found: pip install '.[cuda13]' (numba-cuda[cu13]) to compile kernels")
    bad = {k: v.get("error", "no .entry in PTX") for k, v in res.items() if not v.get("ok")}
    assert len(res) == 12 and not bad, bad


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "sim":
        print(json.dumps(_main_sim()))
    else:
        try:
            print(json.dumps(_main_ptx()))
        except Exception as e:  # no NVVM: say so rather than a bare traceback
            print(json.dumps({"nvvm_missing": {"error": repr(e)}}))
