"""float32 vs bfloat16 matmul speed at the default model's MLP shape ([M, 576] x [576, 3072]),
side by side in one run: whether bf16 pays on this CPU.

    .venv/bin/python benchmarks/matmul_dtype.py
"""

# ruff: noqa: I001  (inflightd must come before torch)
from __future__ import annotations

import time

import inflightd  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads its OpenMP)
import torch
import torch.nn.functional as F


def main() -> None:
    print(f"<!-- python benchmarks/matmul_dtype.py; torch {torch.__version__}, {torch.get_num_threads()} threads -->")
    print("| rows M | fp32 ms | fp32 GFLOP/s | bf16 ms | bf16 GFLOP/s | bf16 / fp32 time |")
    print("|---:|---:|---:|---:|---:|---:|")
    for m in (1, 32, 256):
        t = {}
        for dt in (torch.float32, torch.bfloat16):
            a, w = torch.randn(m, 576, dtype=dt), torch.randn(3072, 576, dtype=dt)
            for _ in range(3):
                F.linear(a, w)
            n = 20
            t0 = time.perf_counter()
            for _ in range(n):
                F.linear(a, w)
            t[dt] = (time.perf_counter() - t0) / n
        flop = 2 * m * 576 * 3072
        f, b = t[torch.float32], t[torch.bfloat16]
        print(f"| {m} | {f * 1e3:.2f} | {flop / f / 1e9:.1f} | {b * 1e3:.2f} | {flop / b / 1e9:.1f} | {b / f:.2f} |")


if __name__ == "__main__":
    main()
