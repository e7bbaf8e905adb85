"""Load time, peak RSS while loading, and single-stream greedy decode speed, for the default
model in float32 and bfloat16, on the paged path (Numba kernels) and on the reference runner
(contiguous cache, torch SDPA). Each case runs in a fresh subprocess so that peak RSS belongs
to that load alone.

    .venv/bin/python benchmarks/model.py [--model default] [--tokens 128] [--matmul numpy,torch]
        [--attention paged,reference] [--dtypes float32,bfloat16] [--repeat 1]

float32 rows run once per CPU matmul backend (`INFLIGHTD_CPU_MATMUL`: NumPy's OpenBLAS, the
default, or torch's MKL); bfloat16 always uses torch's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import inflightd  # first: it sets OMP_WAIT_POLICY before torch loads its OpenMP
import psutil, torch
from inflightd import LLM
from inflightd import SamplingParams
from inflightd.models.loader import load_model
from inflightd.runtime.paged_cache import peak_rss
model, dtype, n, attention = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rss0 = psutil.Process().memory_info().rss
from inflightd.store.store import resolve_model
from inflightd.llm import run_on_own_thread
# The load alone, for its peak RSS; on a thread that exits, as LLM does: an OpenMP pool left on
# this thread would throttle the engine thread's spin (inflightd/runtime/omp_spin.py).
run_on_own_thread(lambda: load_model(resolve_model(model), dtype))
peak = peak_rss()  # VmHWM: ru_maxrss would carry the parent's peak over fork+exec
import gc; gc.collect()
t0 = time.perf_counter()
llm = LLM(model=model, dtype=dtype, attention=attention, kv_cache_memory=1 << 30)
init_s = time.perf_counter() - t0
prompt = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]
p = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
llm.chat(prompt, SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
t = time.perf_counter()
out = llm.chat(prompt, p)
wall = time.perf_counter() - t
print(json.dumps(dict(
    attention=attention, dtype=dtype, matmul=llm.model.cpu.matmul
    if dtype == "float32" else "torch", load_s=llm.load_stats.seconds, init_s=init_s,
    weights_mb=llm.load_stats.weight_bytes / 1e6,
    load_peak_over_base_mb=(peak - rss0) / 1e6, peak_rss_mb=peak / 1e6,
    prompt_tokens=len(out.prompt_token_ids), ttft_ms=out.ttft_s * 1e3, tpot_ms=out.tpot_s * 1e3,
    decode_tok_s=1.0 / out.tpot_s, e2e_tok_s=len(out.token_ids) / wall, threads=torch.get_num_threads(),
)))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--matmul", default="numpy,torch", help="CPU matmul backends for the float32 rows")
    ap.add_argument("--attention", default="paged,reference", help="paged (Numba kernels) and/or reference (SDPA)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeat", type=int, default=1, help="run each case this many times (fresh processes)")
    args = ap.parse_args()
    rows = []
    for attention in args.attention.split(","):
        for dtype in args.dtypes.split(","):
            for matmul in args.matmul.split(",") if dtype == "float32" else ["torch"]:
                cmd = [sys.executable, "-c", CHILD, args.model, dtype, str(args.tokens), attention]
                env = {**os.environ, "INFLIGHTD_CPU_MATMUL": matmul}
                for _ in range(args.repeat):
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                    rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"<!-- {' '.join(sys.argv)} -->")
    cols = ["attention", "dtype", "matmul", "load_s", "init_s", "weights_mb", "load_peak_over_base_mb", "peak_rss_mb",
            "prompt_tokens", "ttft_ms", "tpot_ms", "decode_tok_s", "e2e_tok_s", "threads"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
