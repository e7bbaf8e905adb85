"""GPU check and benchmark of numba_kernels.cuda.

On a GPU: checks every kernel against a torch reference computed on the GPU (fresh random inputs,
NaN-poisoned outputs, float16), then times decode attention at Llama-3-8B-like shapes (32 query /
8 kv heads, head_dim 128, fp16, block 16, batch 64 x context 4096) with CUDA events, and reports
the bandwidth it achieves (K and V bytes read) as a share of a device-to-device copy measured in
the same run (read + write bytes). The goal is >= 70 %. Each section is guarded so that a failure
in one still prints the others; the summary table comes last.

    python benchmarks/gpu_kernels.py            # a CUDA GPU
    python benchmarks/gpu_kernels.py --sim      # Numba's CUDA simulator, tiny sizes (no timing
                                                # worth reading: it proves the script runs)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

ARGS = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ARGS.add_argument("--sim", action="store_true", help="run in the CUDA simulator at tiny sizes")
ARGS.add_argument("--batch", type=int, default=64)
ARGS.add_argument("--context", type=int, default=4096)
ARGS.add_argument("--iters", type=int, default=20)


def main() -> int:
    args = ARGS.parse_args()
    if args.sim:
        # Must precede the first import of numba.cuda: it is read once, process-wide.
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        sys.setswitchinterval(5e-4)
    import torch

    from numba_kernels import cuda as kc

    if args.sim:
        dev, cfg = torch.device("cpu"), kc.LaunchConfig(threads=32, partition=32, tile=8)
        shape = dict(heads=4, kv_heads=2, head_dim=16, block=8)
        batch, context, iters = 2, 45, 1
    else:
        if not torch.cuda.is_available():
            print("no CUDA device (use --sim to exercise the script in the simulator)")
            return 2
        dev, cfg = torch.device("cuda"), kc.DEFAULT_CONFIG
        shape = dict(heads=32, kv_heads=8, head_dim=128, block=16)
        batch, context, iters = args.batch, args.context, args.iters
    rows: list[tuple[str, str, str]] = []

    def section(name: str, fn: Callable[[], str]) -> None:
        try:
            rows.append((name, "ok", fn()))
        except Exception as e:  # report and go on: one failure must not hide the others
            traceback.print_exc()
            rows.append((name, "FAIL", f"{type(e).__name__}: {e}"[:100]))

    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen, device=dev, dtype=torch.float32).to(torch.float16)

    def paged(ctx: list[int]) -> tuple[torch.Tensor, ...]:
        """Caches with shuffled physical blocks, and block tables for these context lengths."""
        bs, hk, d = shape["block"], shape["kv_heads"], shape["head_dim"]
        need = [-(-c // bs) for c in ctx]
        nblocks = sum(need) + 2
        perm = torch.randperm(nblocks, generator=torch.Generator().manual_seed(1))
        tables = torch.zeros(len(ctx), max(need), dtype=torch.int32)
        at = 0
        for i, n in enumerate(need):
            tables[i, :n] = perm[at:at + n]
            at += n
        return (rand(nblocks, bs, hk, d), rand(nblocks, bs, hk, d), tables.to(dev),
                torch.tensor(ctx, dtype=torch.int32, device=dev))

    def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor,
                      ctx: list[int], qlens: list[int]) -> torch.Tensor:
        """float32 torch on the device: gather each sequence's context, causal softmax."""
        group, out, at = shape["heads"] // shape["kv_heads"], [], 0
        for i, (c, n) in enumerate(zip(ctx, qlens)):
            kk = k[tables[i].long()].flatten(0, 1)[:c].float().repeat_interleave(group, 1)
            vv = v[tables[i].long()].flatten(0, 1)[:c].float().repeat_interleave(group, 1)
            s = torch.einsum("nhd,chd->hnc", q[at:at + n].float(), kk) / math.sqrt(q.shape[-1])
            pos = c - n + torch.arange(n, device=dev)
            s = s.masked_fill(torch.arange(c, device=dev)[None, None] > pos[None, :, None], -math.inf)
            out.append(torch.einsum("hnc,chd->nhd", s.softmax(-1), vv))
            at += n
        return torch.cat(out)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    def check_decode(ctx: list[int]) -> str:
        k, v, tables, cl = paged(ctx)
        q = rand(len(ctx), shape["heads"], shape["head_dim"])
        out = torch.full_like(q, math.nan)
        kc.paged_attention_decode(out, q, k, v, tables, cl, 1 / math.sqrt(q.shape[-1]), config=cfg)
        err = rel(out, ref_attention(q, k, v, tables, ctx, [1] * len(ctx)))
        assert not out.isnan().any() and err < 2e-3, f"rel err {err:.3g}"
        return f"rel err {err:.2e}"

    def check_prefill() -> str:
        ctx, qlens = [cfg.partition + 7, 5, 2 * cfg.partition + 3], [9, 5, 1]
        k, v, tables, cl = paged(ctx)
        q = rand(sum(qlens), shape["heads"], shape["head_dim"])
        qsl = torch.tensor([0, 9, 14, 15], dtype=torch.int32, device=dev)
        out = torch.full_like(q, math.nan)
        kc.paged_attention_prefill(out, q, k, v, tables, cl, qsl, 1 / math.sqrt(q.shape[-1]), config=cfg)
        err = rel(out, ref_attention(q, k, v, tables, ctx, qlens))
        assert not out.isnan().any() and err < 2e-3, f"rel err {err:.3g}"
        return f"rel err {err:.2e}"

    def check_write_copy() -> str:
        k, v, _, _ = paged([3 * shape["block"]])
        key, value = rand(5, shape["kv_heads"], shape["head_dim"]), rand(5, shape["kv_heads"], shape["head_dim"])
        slots = torch.tensor([3, -1, 2 * shape["block"], 1, -1], dtype=torch.int64, device=dev)
        rk, rv = k.clone(), v.clone()
        keep = slots >= 0
        rk.view(-1, *k.shape[2:])[slots[keep]] = key[keep]
        rv.view(-1, *v.shape[2:])[slots[keep]] = value[keep]
        kc.write_kv_cache(key, value, k, v, slots, config=cfg)
        assert torch.equal(k, rk) and torch.equal(v, rv), "write_kv_cache mismatch"
        src, dst = torch.tensor([0, 2], device=dev), torch.tensor([4, 1], device=dev)
        rk[dst], rv[dst] = rk[src], rv[src]
        kc.copy_blocks(k, v, src, dst, config=cfg)
        assert torch.equal(k, rk) and torch.equal(v, rv), "copy_blocks mismatch"
        return "bit-exact"

    def timed(fn: Callable[[], Any], n: int) -> float:
        """Seconds per call: CUDA events on a GPU, wall clock in the simulator."""
        fn()
        if dev.type != "cuda":
            t = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t) / n
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / n

    bw: dict[str, float] = {}

    def bench_copy() -> str:
        n = (1 << 30) if dev.type == "cuda" else (1 << 16)
        src = torch.empty(n, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        s = timed(lambda: dst.copy_(src), iters)
        bw["copy"] = 2 * n / s  # read + write
        return f"{bw['copy'] / 1e9:.0f} GB/s (read+write of {n / 2**20:g} MiB)"

    def bench_decode() -> str:
        ctx = [context] * batch
        k, v, tables, cl = paged(ctx)
        q = rand(batch, shape["heads"], shape["head_dim"])
        out = torch.empty_like(q)
        scale = 1 / math.sqrt(shape["head_dim"])
        s = timed(lambda: kc.paged_attention_decode(out, q, k, v, tables, cl, scale,
                                                    max_context_len=context, config=cfg), iters)
        kv_bytes = 2 * sum(ctx) * shape["kv_heads"] * shape["head_dim"] * 2
        bw["decode"] = kv_bytes / s
        share = f", {100 * bw['decode'] / bw['copy']:.0f} % of copy" if "copy" in bw else ""
        return (f"batch {batch} x ctx {context}: {s * 1e6:.0f} us, "
                f"{bw['decode'] / 1e9:.0f} GB/s{share}")

    section("warmup (compile fp16)", lambda: (kc.warmup([torch.float16]), "compiled")[1])
    section("write_kv_cache + copy_blocks", check_write_copy)
    section("decode v1 (one partition)", lambda: check_decode([1, shape["block"], cfg.partition - 3]))
    section("decode v2 (split + combine)", lambda: check_decode([3 * cfg.partition + 5, 17, 2 * cfg.partition]))
    section("prefill (cached prefix)", check_prefill)
    section("d2d copy bandwidth", bench_copy)
    section("decode timing", bench_decode)

    where = "CUDA SIMULATOR (tiny sizes; timings meaningless)" if args.sim else torch.cuda.get_device_name()
    print(f"\nnumba_kernels.cuda on {where}")
    width = max(len(r[0]) for r in rows)
    for name, status, detail in rows:
        print(f"{name:<{width}}  {status:<4}  {detail}")
    return 0 if all(r[1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
