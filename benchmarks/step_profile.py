"""Where a decode step's time goes: wraps the model's building blocks (linears, norms, RoPE, the
vocab projection) and the Numba kernels with wall-clock accumulators, runs B chat requests of
64 greedy tokens together, and prints each part's share of the run.

    python benchmarks/step_profile.py [--batch 1] [--tokens 64] [--dtype float32] [--layer-calls]

Decode steps of up to QGEMM_MAX_TOKENS (16) sequences run each layer as a single Numba call
(numba_kernels.cpu_decode), which the wrappers cannot see into: there `forward` only counts the
prefill, and `decode_tokens` the rest. `--layer-calls` turns that path off (the model's ordinary
forward, ~25 calls per layer) to see its parts, and to compare the two.

Shares overlap where calls nest (`forward` contains `linear`; `execute` contains `forward` and
`logits`). The wrappers add a few µs per call: compare shares, not absolute times, with runs
that are not wrapped.
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable
from typing import Any

import inflightd  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
import inflightd.models.llama as llama
import numba_kernels
from inflightd import LLM, SamplingParams
from inflightd.engine.scheduler_config import SchedulerConfig
from inflightd.models.cpu_paths import CpuPaths

acc: collections.Counter[str] = collections.Counter()


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[name] += time.perf_counter() - t

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--layer-calls", action="store_true", help="one-token steps through the ordinary forward")
    args = ap.parse_args()
    # what the forward looks up at call time: the CPU backend's methods, module-level functions
    CpuPaths.linear = timed("linear", CpuPaths.linear)  # type: ignore[method-assign]
    CpuPaths.rms_norm = timed("rms_norm", CpuPaths.rms_norm)  # type: ignore[method-assign]
    llama.apply_rope = timed("rope", llama.apply_rope)  # type: ignore[assignment]
    llama.cpu_ops.rope_ = timed("rope", llama.cpu_ops.rope_)  # type: ignore[assignment]  # fused path
    for name in ("write_kv_cache", "paged_attention_decode", "paged_attention_prefill"):
        setattr(numba_kernels, name, timed(name, getattr(numba_kernels, name)))
    llm = LLM(model="default", dtype=args.dtype, kv_cache_memory=1 << 30,
              scheduler=SchedulerConfig(max_num_seqs=max(64, args.batch), max_queue_delay_ms=0))
    runner: Any = llm.engine.runner
    runner.execute = timed("execute", runner.execute)
    model: Any = llm.model
    model.forward = timed("forward", model.forward)
    model.logits = timed("logits (vocab projection)", model.logits)
    model.decode_tokens = timed("decode_tokens (one call per layer)", model.decode_tokens)
    if args.layer_calls:
        runner._caches_np = None
    prompts = [[{"role": "user", "content": f"Write story number {i} about a lighthouse."}] for i in range(args.batch)]
    llm.chat(prompts, SamplingParams(max_tokens=4, temperature=0))  # warm-up
    acc.clear()
    t = time.perf_counter()
    outs = llm.chat(prompts, SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True))
    wall = time.perf_counter() - t
    n = sum(len(o.token_ids) for o in outs)
    cmd = f"python benchmarks/step_profile.py --batch {args.batch} --tokens {args.tokens} --dtype {args.dtype}"
    cmd += " --layer-calls" if args.layer_calls else ""
    print(f"<!-- {cmd} -->")
    print(f"batch {args.batch}: {n} tokens in {wall:.2f} s = {n / wall:.1f} tok/s")
    print("| part | ms | share of wall |")
    print("|---|--:|--:|")
    for name, seconds in acc.most_common():
        print(f"| {name} | {seconds * 1e3:.1f} | {100 * seconds / wall:.1f} % |")
    llm.close()


if __name__ == "__main__":
    main()
