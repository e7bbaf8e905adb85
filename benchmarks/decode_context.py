"""One-token decode of the default model (`LlamaModel.decode_tokens`, one Numba call per layer)
against context length, for several attention serial thresholds, interleaved in one process.

The products from the block codes cost the same at every context; what grows is attention
(30 layers x 9 heads over the context). `serial_work`: contexts up to this many positions run
attention on the calling thread, longer ones split over the pool (spinning during one-token
steps, as in the engine). The cache holds random K/V over shuffled blocks; the median and best
of `--rounds` rounds (each the best of `--reps` calls) are printed, the markdown table last.

    python benchmarks/decode_context.py [--contexts 1,128,512,1000] [--serial-work 1024,256,64]
        [--rounds 6] [--reps 10]
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np

import inflightd  # noqa: F401  (first: it sets the OpenMP environment before torch loads)
import numba_kernels
from inflightd.llm import run_on_own_thread
from inflightd.models.llama import LlamaModel
from inflightd.models.loader import load_model
from inflightd.runtime.omp_spin import SpinGovernor
from inflightd.store.store import resolve_model


def main() -> None:
    import torch  # after inflightd, which sets the OpenMP environment before torch loads

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1,128,512,1000")
    ap.add_argument("--serial-work", default="1024,256,64")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    thresholds = [int(s) for s in args.serial_work.split(",")]

    def load() -> LlamaModel:
        model, _ = load_model(resolve_model("default"), "float32", "cpu")
        numba_kernels.warmup()
        model.warm_decode_tokens()
        return model

    model = run_on_own_thread(load)  # a pool left on this thread would throttle the spin
    assert model.one_token_layers(), "the default model should have block codes for every linear"
    SpinGovernor().spin()  # as the engine does for one-token steps
    cfg, bs = model.config, 16
    blocks = -(-max(contexts) // bs)
    rng = np.random.default_rng(0)
    rows = blocks * bs * cfg.num_kv_heads
    caches = [tuple(rng.standard_normal((rows, cfg.head_dim)).astype(np.float32) for _ in range(2))
              for _ in range(cfg.num_layers)]
    table = rng.permutation(blocks).astype(np.int32)[None]
    qsl = np.arange(2, dtype=np.int32)  # one sequence of one token
    times: dict[tuple[int, int], list[float]] = {}
    for _ in range(args.rounds):
        for sw in thresholds:
            model.cpu = replace(model.cpu, decode_serial_work=sw)
            for ctx in contexts:
                best = float("inf")
                pos = ctx - 1
                slot = np.array([int(table[0, pos // bs]) * bs + pos % bs], np.int64)
                ids, positions = torch.tensor([5]), torch.tensor([pos])
                for _ in range(args.reps):
                    t = time.perf_counter()
                    model.decode_tokens(ids, positions, caches, slot, table, np.array([ctx], np.int32),  # type: ignore[arg-type]
                                        qsl, bs)
                    best = min(best, time.perf_counter() - t)
                times.setdefault((sw, ctx), []).append(best * 1e3)
    print(f"<!-- python benchmarks/decode_context.py --contexts {args.contexts} --serial-work {args.serial_work} "
          f"--rounds {args.rounds} --reps {args.reps} -->")
    print("| context | " + " | ".join(f"serial_work {sw}: median (best) ms" for sw in thresholds) + " |")
    print("|--:|" + "--:|" * len(thresholds))
    for ctx in contexts:
        cells = [f"{statistics.median(times[sw, ctx]):.2f} ({min(times[sw, ctx]):.2f})" for sw in thresholds]
        print(f"| {ctx} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
