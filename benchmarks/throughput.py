"""Offline throughput of the in-flight engine against Hugging Face transformers, in one run.

The workload is `benchmarks/prompts.py`: realistic chat prompts (~227 tokens each after the
default model's chat template) with seeded max_tokens in [64, 256] (mean ~156), greedy, with
`ignore_eos` so that every request produces exactly its max_tokens and runs are comparable.
Prompts are rendered and tokenized once, up front, by inflightd's tokenizer; every engine below
gets the same token ids (tokenization is outside every timing).

Measured side by side:

1. inflightd, all `--requests` submitted together (in flight up to `max_num_seqs` = requests);
2. inflightd single stream: `--sequential` requests one at a time;
3. transformers (`--hf-dtype`, bf16 by default as the issue asks; the same GGUF dequantized by
   transformers): sequential `generate` over the
   same `--sequential` requests (a subsample: tok/s comes from what ran), then static batches of
   8 and 32 over the `--requests` (left padding; `max_new_tokens = min_new_tokens =` the batch's
   largest max_tokens; each request counts only its own max_tokens as useful output).

    .venv/bin/python benchmarks/throughput.py [--requests 32] [--dtype auto|bfloat16|float32]
        [--hf-dtype bfloat16|float32] [--max-num-batched-tokens 2048]
        [--sequential 6] [--hf-batches 8,32] [--no-hf] [--quick]

Timing definitions. Every request of a batched run arrives at the run's start, so TTFT includes
queueing (behind other prefills, or behind earlier static batches); single-stream TTFT is the
request's own prefill. TPOT = (last token time - first token time) / (tokens - 1). For
transformers, a logits processor stamps the clock at every generation step: its first call comes
right after the prefill forward, so a static batch's TTFT is observed, not estimated.

"Outside model" for inflightd: the engine's own counter (1 - time in `runner.execute` / time of
whole steps, scheduling excluded), and the same over the wall-clock intervals between steps that
had every request in flight (scheduling and the loop included).
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

# inflightd's OpenMP settings (passive waiting after a bounded spin, see inflightd/runtime/settings.py)
# are read when torch loads, so they are set before torch is imported (inflightd does the same
# at import; a user's setting wins). The transformers baselines run in a child process with the
# runtime's defaults, as transformers users run it.
USER_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
USER_SPINCOUNT = os.environ.get("GOMP_SPINCOUNT")
HF_CHILD = "INFLIGHTD_BENCH_HF_CHILD"  # set in the baselines' process: leave its policy alone
if HF_CHILD not in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import PROMPTS, conversation, output_lengths  # noqa: E402

GOALS = {  # issue 4, "Benchmark"
    "tok_s_batched": 350.0,  # output tok/s with 32 requests in flight
    "tpot_p99_ms": 150.0,
    "tok_s_single": 60.0,
    "outside_share": 0.10,  # of step time, at batch 32
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass
class Row:
    engine: str
    setup: str
    requests: int
    tokens: int  # useful output tokens
    wall_s: float
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    outside: str = "—"
    note: str = ""

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else math.nan


@dataclass(frozen=True)
class Workload:
    ids: list[list[int]]  # the batched run's prompts
    max_tokens: list[int]
    seq_ids: list[list[int]]  # the sequential runs' prompts (never seen by the batched run)
    seq_max_tokens: list[int]


# ------------------------------------------------------------------------------ inflightd
def run_inflightd(args: argparse.Namespace, rows: list[Row]) -> tuple[Workload, dict[str, float]]:
    from inflightd import LLM, SamplingParams
    from inflightd.engine.scheduler_config import SchedulerConfig

    t = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        scheduler=SchedulerConfig(max_num_seqs=max(args.requests, 1),
                                  max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_queue_delay_ms=0, max_waiting=1 << 30),
        kv_cache_memory=args.kv_cache_memory,
    )
    args.dtype = str(llm.model.dtype).removeprefix("torch.")  # "auto" resolved, for the labels
    log(f"inflightd: loaded {args.model} ({args.dtype}) in {time.perf_counter() - t:.1f} s")
    tmpl = llm.chat_template
    if tmpl is None:
        raise SystemExit(f"{args.model} has no chat template: the workload is chat")

    def encode(i: int) -> list[int]:
        return llm.tokenizer.encode(tmpl.render(conversation(i), add_generation_prompt=True), add_special_tokens=False)

    n, k = args.requests, args.sequential
    lengths = [max(1, m // args.shrink) for m in output_lengths(max(n, k))]
    # sequential runs use the "(copy j)" variants the batched run never saw: no prefix-cache
    # hits beyond the system prompt's block, as in the batched run
    first_unseen = -(-n // len(PROMPTS)) * len(PROMPTS)
    work = Workload(
        ids=[encode(i) for i in range(n)],
        max_tokens=lengths[:n],
        seq_ids=[encode(first_unseen + i) for i in range(k)],
        seq_max_tokens=lengths[:k],
    )

    def params(m: int) -> SamplingParams:
        return SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)

    warm = llm.tokenizer.encode(
        tmpl.render([{"role": "user", "content": "Say hello."}], add_generation_prompt=True), add_special_tokens=False
    )
    llm.generate([warm] * 2, params(8))  # first-call costs (torch, Numba dispatch) out of the timings

    stats = llm.engine.stats
    stats.recent = deque(maxlen=1 << 20)  # keep every step of the run, not the last 256
    m0, s0 = stats.model_s, stats.step_s
    t = time.perf_counter()
    outs = llm.generate(work.ids, [params(m) for m in work.max_tokens])
    wall = time.perf_counter() - t
    steps = list(stats.recent)
    got = [len(o.token_ids) for o in outs]
    if got != work.max_tokens:
        raise RuntimeError(f"inflightd produced {got}, expected {work.max_tokens}")
    outside = 1 - (stats.model_s - m0) / (stats.step_s - s0)
    # steps with every request in flight (decode-only at the full batch): engine counter, and the
    # wall-clock period between consecutive step ends (scheduling and the loop included)
    full = [i for i, s in enumerate(steps) if s[1] == n and s[2] == n]
    full_model = sum(steps[i][3] for i in full)
    full_step = sum(steps[i][4] for i in full)
    full_wall = sum(steps[i][0] - steps[i - 1][0] for i in full if i > 0)
    full_model_w = sum(steps[i][3] for i in full if i > 0)
    facts = {
        "prompt_tokens_mean": sum(map(len, work.ids)) / n,
        "max_tokens_mean": sum(work.max_tokens) / n,
        "cached_tokens": float(sum(o.cached_tokens for o in outs)),
        "steps": float(len(steps)),
        "full_steps": float(len(full)),
        "outside_all": outside,
        "outside_full": 1 - full_model / full_step if full_step else math.nan,
        "outside_full_wall": 1 - full_model_w / full_wall if full_wall else math.nan,
        "full_step_ms": 1e3 * full_wall / max(len(full) - 1, 1) if full_wall else math.nan,
    }
    rows.append(
        Row(
            "inflightd",
            f"{n} in flight, {args.dtype}, budget {args.max_num_batched_tokens}",
            n,
            sum(got),
            wall,
            [o.ttft_s for o in outs],
            [o.tpot_s for o in outs],
            f"{outside:.1%} (batch {n}: {facts['outside_full']:.1%}; wall {facts['outside_full_wall']:.1%})",
        )
    )
    log(f"inflightd batched: {sum(got)} tokens in {wall:.1f} s = {sum(got) / wall:.1f} tok/s")

    single = Row("inflightd", f"single stream, {args.dtype}", k, 0, 0.0)
    for ids, m in zip(work.seq_ids, work.seq_max_tokens):
        t = time.perf_counter()
        (o,) = llm.generate([ids], params(m))
        single.wall_s += time.perf_counter() - t
        single.tokens += len(o.token_ids)
        single.ttft_s.append(o.ttft_s)
        single.tpot_s.append(o.tpot_s)
    rows.append(single)
    log(f"inflightd single stream: {single.tok_s:.1f} tok/s")
    llm.close()
    return work, facts


# ---------------------------------------------------------------------------- transformers
def run_hf(args: argparse.Namespace, work: Workload, rows: list[Row]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList
    from transformers.utils import logging as hf_logging

    from inflightd.store.store import resolve_model

    hf_logging.set_verbosity_error()
    path = resolve_model(args.model)
    t = time.perf_counter()
    hf_dtype = getattr(torch, args.hf_dtype)
    short = {"bfloat16": "bf16", "float32": "fp32"}[args.hf_dtype]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=hf_dtype)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    log(f"transformers: loaded the GGUF ({short}) in {time.perf_counter() - t:.1f} s")

    class StepClock(LogitsProcessor):
        """Stamps the clock at each generation step, right after that step's forward."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return scores

    def generate(batch_ids: list[list[int]], max_tokens: list[int]) -> tuple[float, float, list[float]]:
        """→ start time, end time, step clock times (the first right after the prefill)."""
        enc = tok.pad({"input_ids": batch_ids}, padding=True, return_tensors="pt")
        m = max(max_tokens)
        clock = StepClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=m,
                min_new_tokens=m,
                logits_processor=LogitsProcessorList([clock]),
                pad_token_id=tok.pad_token_id,
            )
        t1 = time.perf_counter()
        if out.shape[1] - enc["input_ids"].shape[1] != m or len(clock.times) != m:
            raise RuntimeError(f"transformers generated {out.shape[1] - enc['input_ids'].shape[1]} tokens, not {m}")
        return t0, t1, clock.times

    def record(row: Row, times: list[float], arrival: float, max_tokens: list[int]) -> None:
        for mt in max_tokens:
            row.ttft_s.append(times[0] - arrival)
            if mt > 1:
                row.tpot_s.append((times[mt - 1] - times[0]) / (mt - 1))
            row.tokens += mt

    generate([work.seq_ids[0][:32]], [4])  # warm-up

    seq = Row("transformers", f"sequential generate, {short}", len(work.seq_ids), 0, 0.0)
    for ids, m in zip(work.seq_ids, work.seq_max_tokens):
        t0, t1, times = generate([ids], [m])
        seq.wall_s += t1 - t0
        record(seq, times, t0, [m])
    seq.note = f"subsample of {len(work.seq_ids)}"
    rows.append(seq)
    log(f"transformers sequential: {seq.tok_s:.1f} tok/s")

    n = len(work.ids)
    for b in args.hf_batches:
        row = Row("transformers", f"static batch {b}, {short}", n, 0, 0.0)
        start = time.perf_counter()  # every request arrives now: later batches queue
        generated = 0
        for lo in range(0, n, b):
            mts = work.max_tokens[lo : lo + b]
            _, _, times = generate(work.ids[lo : lo + b], mts)
            record(row, times, start, mts)
            generated += max(mts) * len(mts)
        row.wall_s = time.perf_counter() - start
        row.note = f"{row.tokens} useful of {generated} generated"
        rows.append(row)
        log(f"transformers static batch {b}: {row.tok_s:.1f} tok/s")


def _hf_rows(args: argparse.Namespace, work: Workload) -> list[Row]:
    rows: list[Row] = []
    log(f"transformers child: OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(runtime default)')}")
    run_hf(args, work, rows)
    return rows


def run_hf_child(args: argparse.Namespace, work: Workload) -> list[Row]:
    """The transformers baselines in a fresh process: its own torch, OpenMP's default wait policy
    (unless the user set one), no Numba pool beside it."""
    if USER_WAIT_POLICY is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    if USER_SPINCOUNT is None:
        os.environ.pop("GOMP_SPINCOUNT", None)
    os.environ[HF_CHILD] = "1"
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_hf_rows, (args, work))
    finally:
        del os.environ[HF_CHILD]
        os.environ["OMP_WAIT_POLICY"] = USER_WAIT_POLICY or "PASSIVE"
        os.environ["GOMP_SPINCOUNT"] = USER_SPINCOUNT or "10000"


# ---------------------------------------------------------------------------------- report
def machine_facts() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numba
    import transformers

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{model}; {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable); "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, Numba {numba.get_num_threads()} threads; "
        f"transformers {transformers.__version__}; OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY')}, "
        f"GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT')} for inflightd, "
        f"{USER_WAIT_POLICY or 'runtime default'} for transformers (own process); load average at the end {load}"
    )


def ms(x: float) -> str:
    return "—" if math.isnan(x) else f"{x * 1e3:,.0f}"


def report(args: argparse.Namespace, rows: list[Row], facts: dict[str, float], wall: float) -> str:
    hf32 = next((r for r in rows if r.setup.startswith("static batch 32")), None)
    lines = [
        f"<!-- {shlex.join(['python', 'benchmarks/throughput.py', *sys.argv[1:]])} -->",
        f"<!-- machine: {machine_facts()} -->",
        "",
        f"Workload: {len(rows[0].ttft_s) if rows else 0} chat requests, prompt mean "
        f"{facts.get('prompt_tokens_mean', math.nan):.0f} tokens after the chat template, max_tokens mean "
        f"{facts.get('max_tokens_mean', math.nan):.0f} (greedy, ignore_eos); model {args.model}; "
        f"whole benchmark {wall / 60:.1f} min.",
        "",
        "| engine | setup | requests | output tokens | wall s | output tok/s | TTFT p50 ms | TTFT p99 ms "
        "| TPOT p50 ms | TPOT p99 ms | outside model | note |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in rows:
        rel = (
            f"; {r.tok_s / hf32.tok_s:.2f}× HF b32"
            if hf32 and r.engine == "inflightd" and "in flight" in r.setup
            else ""
        )
        lines.append(
            f"| {r.engine} | {r.setup} | {r.requests} | {r.tokens:,} | {r.wall_s:.1f} | {r.tok_s:.1f} "
            f"| {ms(pct(r.ttft_s, 50))} | {ms(pct(r.ttft_s, 99))} | {ms(pct(r.tpot_s, 50))} | {ms(pct(r.tpot_s, 99))} "
            f"| {r.outside} | {(r.note + rel).lstrip('; ')} |"
        )
    lines += [
        "",
        "Notes: batched runs submit every request at t = 0, so TTFT includes queueing (for static batches, "
        "behind the earlier batches); single-stream and sequential TTFT is the request's own prefill. "
        "Transformers' TTFT and TPOT come from a logits processor that stamps each generation step (the "
        "first stamp follows the prefill forward); a static batch runs to its longest request, and each "
        "request counts only its own max_tokens (its TPOT over those). The sequential transformers row "
        "ran a subsample and its tok/s is from that subsample only. Transformers runs in --hf-dtype. "
        f"inflightd: {facts.get('steps', 0):.0f} steps, {facts.get('full_steps', 0):.0f} of them decode steps "
        f"with all requests in flight ({facts.get('full_step_ms', math.nan):.0f} ms each); prefix-cache hits "
        f"{facts.get('cached_tokens', 0):.0f} prompt tokens (the shared system prompt). Outside model: the "
        "engine's counter over the run (scheduling excluded); in brackets over full-batch steps, by the "
        "same counter and by wall clock between step ends (scheduling and the loop included).",
    ]
    batched = next((r for r in rows if r.engine == "inflightd" and "in flight" in r.setup), None)
    single = next((r for r in rows if r.engine == "inflightd" and "single" in r.setup), None)
    if batched is not None and single is not None:

        def met(ok: bool) -> str:
            return "yes" if ok else "**no**"

        tpot99 = pct(batched.tpot_s, 99) * 1e3
        share = facts["outside_full_wall"]
        if math.isnan(share):
            share = facts["outside_all"]
        lines += [
            "",
            "| goal (issue 4) | target | measured | met |",
            "|---|--:|--:|---|",
            f"| output tok/s, {batched.requests} in flight | ≥ {GOALS['tok_s_batched']:.0f} | {batched.tok_s:.1f} "
            f"| {met(batched.tok_s >= GOALS['tok_s_batched'])} |",
            "| … vs HF static batch 32 | ≥ 3.5× | "
            + (
                f"{batched.tok_s / hf32.tok_s:.2f}× | {met(batched.tok_s >= 3.5 * hf32.tok_s)} |" if hf32 else "— | — |"
            ),
            f"| TPOT p99 ms, {batched.requests} in flight | ≤ {GOALS['tpot_p99_ms']:.0f} | {tpot99:.0f} "
            f"| {met(tpot99 <= GOALS['tpot_p99_ms'])} |",
            f"| single stream tok/s | ≥ {GOALS['tok_s_single']:.0f} | {single.tok_s:.1f} "
            f"| {met(single.tok_s >= GOALS['tok_s_single'])} |",
            f"| outside model, batch {batched.requests} (wall) | < {GOALS['outside_share']:.0%} | {share:.1%} "
            f"| {met(share < GOALS['outside_share'])} |",
        ]
        if args.quick or batched.requests != 32:
            lines.append("")
            lines.append("(Goals are stated for the full run: 32 requests in flight, full output lengths.)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=32, help="requests in flight together (default 32)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="inflightd's dtype (auto: float32 on a CPU without bf16 instructions)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048,
                    help="inflightd's token budget per step (scheduler.max_num_batched_tokens)")
    ap.add_argument("--hf-dtype", default="bfloat16", choices=["bfloat16", "float32"], help="transformers' dtype")
    ap.add_argument("--kv-cache-memory", default="auto", help="bytes, or 'auto' (default)")
    ap.add_argument("--sequential", type=int, default=6, help="requests run one at a time (both engines)")
    ap.add_argument("--hf-batches", default="8,32", help="transformers static batch sizes ('' for none)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 requests, outputs ÷ 8, small batches")
    args = ap.parse_args()
    args.shrink = 1
    if args.quick:
        args.requests, args.sequential, args.shrink, args.hf_batches = 4, 1, 8, "2,4"
    args.hf_batches = [int(b) for b in args.hf_batches.split(",") if b.strip()]
    if args.kv_cache_memory != "auto":
        args.kv_cache_memory = int(args.kv_cache_memory)
    if args.requests < 1 or args.sequential < 1:
        ap.error("--requests and --sequential must be ≥ 1")

    t = time.perf_counter()
    rows: list[Row] = []
    work, facts = run_inflightd(args, rows)
    gc.collect()
    if not args.no_hf:
        rows += run_hf_child(args, work)
    print(report(args, rows, facts, time.perf_counter() - t))


if __name__ == "__main__":
    main()
