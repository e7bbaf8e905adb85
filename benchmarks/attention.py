"""Paged decode attention on the CPU against torch's scaled_dot_product_attention.

For the default model's attention shapes (9 query heads, 3 KV heads, head_dim 64, block 16)
and each batch x context point, times ``numba_kernels.paged_attention_decode`` (the public
entry point, validation included) over shuffled physical blocks, and as references:
  (a) torch SDPA over an already-contiguous cache [B, kv_heads, ctx, D] (enable_gqa=True): the
      lower bound that no paging at all would give;
  (b) gather-then-SDPA: index the paged cache into a contiguous copy, then SDPA (what a paged
      engine without a paged kernel has to do).
It also measures the machine's copy bandwidth in the same run (a large numpy copy), to put the
kernel's K/V read rate in GB/s next to it. The three methods are run in turn within each
repetition so that noise from other processes hits all of them alike; times are the best of
``--reps``. The markdown table comes last, headed by the command line.

``--interleave`` instead measures what alternating torch ops with parallel Numba kernels costs
under each threading configuration (each in a fresh process, since the threading layer and
OMP_WAIT_POLICY are fixed at first use). ``--serial-sweep`` times small decode batches on the
calling thread against the pool (where ``numba_kernels.cpu.SERIAL_WORK`` comes from).
"""
from __future__ import annotations

import os

# As the daemon runs its multi-token steps (numba_kernels sets the policy too, but torch is
# imported first here): workers sleep after a region (inflightd throttles libgomp's spin for
# every step but single-token ones, see inflightd/runtime/omp_spin.py).
if "--interleave" not in " ".join(__import__("sys").argv):
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    os.environ.setdefault("GOMP_SPINCOUNT", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

H, KVH, D, BS = 9, 3, 64, 16  # the default model (SmolLM2-135M): 9 heads, 3 KV heads


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Best large-copy rate in GB/s, counting bytes read + written."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def round_times(fns: list[Callable[[], object]], reps: int) -> np.ndarray:
    """Seconds of each fn in each of reps rounds ([reps, len(fns)]), run round-robin so that
    a slow spell of this shared machine hits every method of a round alike."""
    for fn in fns:
        fn()
    t = np.empty((reps, len(fns)))
    for r in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            t[r, i] = time.perf_counter() - t0
    return t


def best_times(fns: list[Callable[[], object]], reps: int) -> list[float]:
    """Best-of-reps seconds for each fn, running them round-robin."""
    return [float(x) for x in round_times(fns, reps).min(axis=0)]


def bench_point(batch: int, ctx: int, dtype: torch.dtype, reps: int) -> dict[str, float]:
    import numba_kernels as nk

    g = torch.Generator().manual_seed(batch * 100003 + ctx)
    nblk = -(-ctx // BS)
    num_blocks = batch * nblk
    k_cache = torch.randn(num_blocks, BS, KVH, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, BS, KVH, D, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g).to(torch.int32).view(batch, nblk).contiguous()
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    q = torch.randn(batch, H, D, generator=g).to(dtype)
    out = torch.empty_like(q)
    scale = D**-0.5
    # (a): the same values, already contiguous per sequence and head.
    k_cont = k_cache[tables.long()].reshape(batch, nblk * BS, KVH, D)[:, :ctx].transpose(1, 2).contiguous()
    v_cont = v_cache[tables.long()].reshape(batch, nblk * BS, KVH, D)[:, :ctx].transpose(1, 2).contiguous()
    q4 = q.view(batch, H, 1, D)

    def paged() -> None:
        nk.paged_attention_decode(out, q, k_cache, v_cache, tables, lens, scale)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q4, k_cont, v_cont, scale=scale, enable_gqa=True)

    def gather_sdpa() -> torch.Tensor:
        idx = tables.long()
        k = k_cache[idx].view(batch, nblk * BS, KVH, D)[:, :ctx].transpose(1, 2)
        v = v_cache[idx].view(batch, nblk * BS, KVH, D)[:, :ctx].transpose(1, 2)
        return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

    paged()
    err = float((out.double() - sdpa().view(batch, H, D).double()).norm() / sdpa().double().norm())
    rounds = round_times([paged, sdpa, gather_sdpa], reps)
    t_paged, t_sdpa, t_gather = rounds.min(axis=0)
    kv_bytes = 2 * batch * ctx * KVH * D * k_cache.element_size()
    return {"paged_us": t_paged * 1e6, "sdpa_us": t_sdpa * 1e6, "gather_us": t_gather * 1e6,
            # The ratio within each round (the two calls ran back to back), median over rounds:
            # less exposed than a ratio of two bests to a spell that spared one method's best.
            "round_ratio": float(np.median(rounds[:, 0] / rounds[:, 1])),
            "kv_gbs": kv_bytes / t_paged / 1e9, "rel_err": err}


def run_table(args: argparse.Namespace) -> None:
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    import numba

    import numba_kernels as nk

    nk.warmup(dtypes)
    bw = copy_bandwidth()
    rows = []
    for dtype in dtypes:
        for b in map(int, args.batches.split(",")):
            for c in map(int, args.contexts.split(",")):
                r = bench_point(b, c, dtype, args.reps)
                rows.append((str(dtype).removeprefix("torch."), b, c, r))
                print(f"{rows[-1][0]} B={b} ctx={c}: {json.dumps({k: round(v, 6) for k, v in r.items()})}",
                      flush=True)
    print()
    print(f"<!-- {' '.join([os.path.basename(sys.executable)] + sys.argv)} -->")
    print(f"<!-- numba {numba.__version__} threading layer {numba.threading_layer()}, "
          f"{numba.get_num_threads()} numba threads, {torch.get_num_threads()} torch threads; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}; copy bandwidth {bw:.1f} GB/s "
          f"(read + write, {os.cpu_count()} CPUs); "
          f"times are the best of {args.reps} rounds -->")
    print("| dtype | batch | context | paged µs | SDPA contiguous µs | gather+SDPA µs | "
          "paged / SDPA (bests) | paged / SDPA (median round) | paged / gather | KV read GB/s | "
          "% of copy BW |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, b, c, r in rows:
        print(f"| {name} | {b} | {c} | {r['paged_us']:.1f} | {r['sdpa_us']:.1f} | "
              f"{r['gather_us']:.1f} | {r['paged_us'] / r['sdpa_us']:.2f} | "
              f"{r['round_ratio']:.2f} | "
              f"{r['paged_us'] / r['gather_us']:.2f} | {r['kv_gbs']:.1f} | "
              f"{100 * r['kv_gbs'] / bw:.0f}% |")


def interleave_child(pairs: int, rounds: int = 7) -> None:
    """One configuration (set by the parent's environment): time a torch matmul alone, the
    Numba decode kernel alone, and the two alternating; print JSON."""
    import numba

    import numba_kernels as nk

    batch, ctx = 8, 512
    x = torch.randn(32, 576)
    w = torch.randn(576, 1536)  # the default model's MLP up-projection for 32 tokens
    nblk = ctx // BS
    k = torch.randn(batch * nblk, BS, KVH, D)
    v = torch.randn_like(k)
    tables = torch.randperm(batch * nblk).to(torch.int32).view(batch, nblk).contiguous()
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    q = torch.randn(batch, H, D)
    out = torch.empty_like(q)

    def mm() -> None:
        torch.mm(x, w)

    def attn() -> None:
        nk.paged_attention_decode(out, q, k, v, tables, lens, D**-0.5)

    def per_call(fns: list[Callable[[], None]]) -> tuple[float, float]:
        """(wall µs, process CPU µs) per iteration: CPU time shows threads that spin."""
        t, c = time.perf_counter(), time.process_time()
        for _ in range(pairs):
            for fn in fns:
                fn()
        return ((time.perf_counter() - t) / pairs * 1e6, (time.process_time() - c) / pairs * 1e6)

    mm()
    attn()
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):  # best of several rounds: the machine may be shared
        for key, fns in (("mm", [mm]), ("attn", [attn]), ("pair", [mm, attn])):
            r = per_call(fns)
            if key not in best or r[0] < best[key][0]:
                best[key] = r
    res = {f"{k}_us": v[0] for k, v in best.items()} | {f"{k}_cpu_us": v[1] for k, v in best.items()}
    res["overhead_us"] = res["pair_us"] - res["mm_us"] - res["attn_us"]
    res["layer"] = numba.threading_layer()
    print(json.dumps(res))


def run_interleave(args: argparse.Namespace) -> None:
    configs = [
        ("workqueue", {"NUMBA_THREADING_LAYER": "workqueue"}),
        ("workqueue + OMP_WAIT_POLICY=passive", {"NUMBA_THREADING_LAYER": "workqueue",
                                                 "OMP_WAIT_POLICY": "passive"}),
        ("omp", {"NUMBA_THREADING_LAYER": "omp"}),
        ("omp + OMP_WAIT_POLICY=passive", {"NUMBA_THREADING_LAYER": "omp",
                                           "OMP_WAIT_POLICY": "passive"}),
        ("omp + GOMP_SPINCOUNT=20000", {"NUMBA_THREADING_LAYER": "omp",
                                        "GOMP_SPINCOUNT": "20000"}),
        ("workqueue, numba 1 thread", {"NUMBA_THREADING_LAYER": "workqueue",
                                       "NUMBA_NUM_THREADS": "1"}),
    ]
    rows = []
    for name, extra in configs:
        env = {k: v for k, v in os.environ.items()
               if k not in ("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY", "NUMBA_NUM_THREADS",
                            "GOMP_SPINCOUNT")}
        # An empty value keeps numba_kernels from defaulting it to passive (libgomp ignores it).
        env.setdefault("OMP_WAIT_POLICY", "")
        env.update(extra)
        p = subprocess.run([sys.executable, __file__, "--interleave-child", str(args.pairs)],
                           env=env, capture_output=True, text=True, check=True)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append((name, r))
        print(name, json.dumps(r), flush=True)
    print()
    print(f"<!-- {' '.join([os.path.basename(sys.executable)] + sys.argv)} -->")
    print(f"<!-- torch.mm [32,576]x[576,1536] then paged decode B=8 ctx=512 (fp32), "
          f"{args.pairs} iterations per round, best of 7 rounds; CPU = process CPU time -->")
    print("| configuration | layer | mm alone µs (CPU) | attention alone µs (CPU) | "
          "mm + attention µs (CPU) | overhead per pair µs |")
    print("|---|---|---:|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['layer']} | {r['mm_us']:.0f} ({r['mm_cpu_us']:.0f}) | "
              f"{r['attn_us']:.0f} ({r['attn_cpu_us']:.0f}) | {r['pair_us']:.0f} "
              f"({r['pair_cpu_us']:.0f}) | {r['overhead_us']:.0f} |")


def run_serial_sweep(args: argparse.Namespace) -> None:
    """Where cpu.SERIAL_WORK comes from: one decode batch on the calling thread alone against
    the same batch planned over the pool, by total context (sum over sequences)."""
    import numba_kernels as nk
    from numba_kernels import cpu

    nk.warmup()
    points = [(1, 256), (1, 512), (1, 1024), (1, 1536), (1, 2048), (2, 512), (2, 1024),
              (4, 256), (4, 512), (8, 128), (8, 192), (8, 256), (16, 128)]
    rows = []
    for batch, ctx in points:
        g = torch.Generator().manual_seed(batch * 7919 + ctx)
        nblk = -(-ctx // BS)
        k = torch.randn(batch * nblk, BS, KVH, D, generator=g).numpy()
        v = torch.randn(batch * nblk, BS, KVH, D, generator=g).numpy()
        tables = torch.randperm(batch * nblk, generator=g).to(torch.int32).view(batch, nblk).numpy()
        lens = np.full(batch, ctx, np.int32)
        qsl = np.arange(batch + 1, dtype=np.int32)
        q = torch.randn(batch, H, D, generator=g).numpy()
        out = np.empty_like(q)

        t_serial, t_pool = best_times([
            partial(cpu.attention, out, q, k, v, tables, lens, qsl, D**-0.5, serial_work=work)
            for work in (1 << 40, 0)], args.reps)
        rows.append((batch, ctx, t_serial * 1e6, t_pool * 1e6))
    print()
    print(f"<!-- {' '.join([os.path.basename(sys.executable)] + sys.argv)} -->")
    print(f"<!-- {__import__('numba').get_num_threads()} numba threads; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}; best of {args.reps}; "
          f"cpu.SERIAL_WORK = {cpu.SERIAL_WORK} -->")
    print("| batch | context | total context | serial µs | pool µs | serial / pool |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b, c, ts, tp in rows:
        print(f"| {b} | {c} | {b * c} | {ts:.0f} | {tp:.0f} | {ts / tp:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="128,512,2048")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--interleave", action="store_true",
                    help="measure torch/Numba alternation per threading configuration")
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--interleave-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serial-sweep", action="store_true",
                    help="decode on the calling thread vs over the pool, by total context")
    args = ap.parse_args()
    if args.interleave_child:
        interleave_child(args.interleave_child)
    elif args.interleave:
        run_interleave(args)
    elif args.serial_sweep:
        run_serial_sweep(args)
    else:
        run_table(args)


if __name__ == "__main__":
    main()
