"""float32 matmul backends on the CPU for the default model's linears: torch (MKL here) vs NumPy
(the OpenBLAS its wheels bundle), side by side in one process, on the shapes one decoder layer
runs and the vocab projection, for token counts from one (single-stream decode) to a full
prefill budget.

    python benchmarks/matmul_backend.py [--tokens 1,8,32,64,512,2048] [--repeats 5]

Each cell is the best of --repeats calls (after one warm-up); `speedup` = torch / numpy time.
`numpy cols` is NumPy with the weight stored column-major (what the loader does for CPU float32
models, `llama.column_major_weights`), `cols gain` = numpy / numpy cols time. Last, what the
layout costs the tied embedding's lookups (strided gathers), per token count.
First line: the memory read bandwidth (best `torch.sum` over 256 MB), the bound for a decode
step that reads every weight once.
This measurement is why `inflightd.models.llama.linear` sends float32 CPU matmuls to NumPy
(`INFLIGHTD_CPU_MATMUL=torch` switches back).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as inflightd runs
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import numpy as np  # noqa: E402
import torch  # noqa: E402

# (name, out_features, in_features) of SmolLM2-135M: fused qkv, o, fused gate/up, down, lm_head
SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("lm_head", 49152, 576)]


def best(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,8,32,64,512,2048")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"<!-- python benchmarks/matmul_backend.py --tokens {args.tokens} --repeats {args.repeats} -->")
    big = torch.ones(64 * 2**20)  # 256 MB of float32
    read_s = best(lambda: big.sum(), args.repeats)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}; "
          f"memory read bandwidth {big.numel() * 4 / read_s / 1e9:.1f} GB/s")
    print("| tokens | linear | torch ms | numpy ms | speedup | numpy cols ms | cols gain | numpy cols GFLOP/s |")
    print("|--:|---|--:|--:|--:|--:|--:|--:|")
    for m in (int(x) for x in args.tokens.split(",")):
        for name, out_f, in_f in SHAPES:
            rows = min(m, 64) if name == "lm_head" else m  # logits only for the sampled rows
            w = torch.randn(out_f, in_f)
            x = torch.randn(rows, in_f)
            wn, xn = w.numpy(), x.numpy()
            wc = np.asfortranarray(wn)  # same [out, in] matrix, column-major
            t_torch = best(lambda x=x, w=w: torch.nn.functional.linear(x, w), args.repeats)
            t_np = best(lambda xn=xn, wn=wn: np.matmul(xn, wn.T), args.repeats)
            t_cols = best(lambda xn=xn, wc=wc: np.matmul(xn, wc.T), args.repeats)
            gflops = 2 * rows * out_f * in_f / t_cols / 1e9
            cells = [str(rows), name, f"{t_torch * 1e3:.3f}", f"{t_np * 1e3:.3f}", f"{t_torch / t_np:.2f}×",
                     f"{t_cols * 1e3:.3f}", f"{t_np / t_cols:.2f}×", f"{gflops:.1f}"]
            print("| " + " | ".join(cells) + " |")
    # The price of the column-major layout: the tied embedding's row lookups become strided.
    embed = torch.randn(SHAPES[-1][1], SHAPES[-1][2])
    cols = embed.t().contiguous().t()
    for n in (int(x) for x in args.tokens.split(",")):
        ids = torch.randint(0, embed.shape[0], (n,))
        t_rows = best(lambda ids=ids: torch.nn.functional.embedding(ids, embed), args.repeats)
        t_emb = best(lambda ids=ids: torch.nn.functional.embedding(ids, cols), args.repeats)
        print(f"embedding lookup of {n} ids: rows {t_rows * 1e3:.3f} ms, column-major {t_emb * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
