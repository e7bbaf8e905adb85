"""A decode step's linears of the default model for a few tokens: float32 BLAS against the GGUF
block codes (numba_kernels.cpu_qmatmul), under each OpenMP wait setting.

Every linear of every layer plus the vocab projection, in model order, for M tokens (what a
decode step of M sequences multiplies; `--tokens`, 1 by default), with a few µs of Python
between the calls as the forward has. Each configuration runs in a fresh process because libgomp reads its settings
once, when it loads:

- ``GOMP_SPINCOUNT=10000`` (inflightd's default, with OMP_WAIT_POLICY=PASSIVE): workers spin
  ~0.1-0.2 ms after a parallel region before sleeping;
- ``GOMP_SPINCOUNT=0``: they sleep at once (what OMP_WAIT_POLICY=PASSIVE alone gives), so each
  region pays a wake-up.

The model is loaded on a thread that then exits (as `LLM` does, see `run_on_own_thread`), and
the products run on the main thread. Each method runs in its own process too: OpenBLAS's
threads keep spinning for a while after a call, which would slow whatever runs next (in a
decode step of one sequence nothing calls BLAS). Times are the best of ``--reps``. The markdown
table comes last.

    python benchmarks/qgemv.py [--reps 15] [--tokens 1,2,4,8,12,16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import inflightd  # noqa: F401  (first: it sets the OpenMP environment before torch loads)


def child(method: str, reps: int, tokens: list[int]) -> None:
    import numba
    import numpy as np
    import torch

    import numba_kernels
    from inflightd.llm import run_on_own_thread
    from inflightd.models import llama
    from inflightd.models.cpu_paths import qgemm
    from inflightd.models.loader import load_model
    from inflightd.store.store import resolve_model

    def load() -> llama.LlamaModel:
        model, _ = load_model(resolve_model("default"), "float32", "cpu")
        numba_kernels.warmup()
        return model

    model = run_on_own_thread(load)
    w = model.weights
    cfg = model.config
    steps: list[tuple[torch.Tensor, llama.QuantWeight]] = []
    for lw in w.layers:
        assert lw.qkv_q and lw.o_q and lw.gate_up_q and lw.down_q
        steps += [(lw.qkv, lw.qkv_q), (lw.o, lw.o_q), (lw.gate_up, lw.gate_up_q), (lw.down, lw.down_q)]
    assert w.lm_head_q is not None
    steps.append((w.lm_head, w.lm_head_q))
    g = torch.Generator().manual_seed(0)
    f32_bytes = sum(t.numel() * 4 for t, _ in steps)
    code_bytes = sum(q.num_bytes() for _, q in steps)
    for m in tokens:
        xs = {k: torch.randn(m, k, generator=g) for k in {t.shape[1] for t, _ in steps}}

        def blas(xs: dict[int, torch.Tensor] = xs) -> None:
            for t, _ in steps:
                torch.from_numpy(np.matmul(xs[t.shape[1]].numpy(), t.numpy().T))

        def codes(xs: dict[int, torch.Tensor] = xs) -> None:
            for t, q in steps:
                qgemm(xs[t.shape[1]], q)

        x = xs[cfg.hidden_size]
        ref = x.double() @ w.layers[0].gate_up.double().T
        err = float((qgemm(x, w.layers[0].gate_up_q).double() - ref).norm() / ref.norm())
        fn = blas if method == "blas" else codes
        fn()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        print(json.dumps({"tokens": m, "ms": best * 1e3, "rel_err": err, "f32_mb": f32_bytes / 1e6,
                          "code_mb": code_bytes / 1e6, "threads": numba.get_num_threads()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--tokens", default="1", help="comma-separated token counts (rows of x)")
    ap.add_argument("--child", choices=("blas", "codes"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.reps, [int(t) for t in args.tokens.split(",")])
        return
    tokens = [int(t) for t in args.tokens.split(",")]
    rows: list[tuple[str, int, dict[str, float]]] = []
    for spin in ("10000", "0"):
        per_m: dict[int, dict[str, float]] = {m: {} for m in tokens}
        for method in ("blas", "codes"):
            env = dict(os.environ, GOMP_SPINCOUNT=spin)
            env.pop("OMP_WAIT_POLICY", None)  # inflightd sets PASSIVE
            p = subprocess.run([sys.executable, __file__, "--child", method, "--reps", str(args.reps),
                                "--tokens", args.tokens], env=env, capture_output=True, text=True, check=True)
            for line in p.stdout.strip().splitlines():
                if line.startswith("{"):
                    one = json.loads(line)
                    per_m[one["tokens"]].update(one, **{f"{method}_ms": one["ms"]})
                    print(spin, method, one, flush=True)
        rows += [(spin, m, per_m[m]) for m in tokens]
    first = rows[0][2]
    print()
    print(f"<!-- {' '.join([os.path.basename(sys.executable)] + sys.argv)} -->")
    print(f"<!-- {first['threads']} threads; best of {args.reps}; weights per step: float32 "
          f"{first['f32_mb']:.0f} MB, codes {first['code_mb']:.0f} MB; "
          f"codes vs float64 rel. error {first['rel_err']:.1e} -->")
    print("| GOMP_SPINCOUNT | tokens | float32 BLAS ms | block codes ms | codes / BLAS |")
    print("|---:|---:|---:|---:|---:|")
    for spin, m, r in rows:
        print(f"| {spin} | {m} | {r['blas_ms']:.1f} | {r['codes_ms']:.1f} | {r['codes_ms'] / r['blas_ms']:.2f} |")


if __name__ == "__main__":
    main()
