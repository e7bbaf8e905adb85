"""The engine under faults, with the real scheduler, block manager, sampler and tokenizer and a
scripted runner in place of the model (the `Runner` contract: logits for the sampled chunks):

- a request is queued all or nothing: one refused leaves no state behind;
- an exception inside one step fails only that step's requests (an error output each), the
  blocks it was writing leave the prefix cache, and the engine goes on;
- a fatal error (the runtime's `is_fatal`), or too many failed steps in a row, stops the engine
  and fails everything in flight;
- `queue_timeout_s` takes a request that waited too long out of the queue (fake clock).
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from inflightd.engine.block_manager import BlockManager
from inflightd.engine.engine import MAX_FAILED_STEPS, Engine
from inflightd.engine.outputs import EngineOutput
from inflightd.engine.sampling_params import SamplingParams, SamplingParamsError
from inflightd.engine.scheduler import Scheduler
from inflightd.engine.scheduler_config import RequestLimits, SchedulerConfig
from inflightd.engine.sequence import SeqChunk
from inflightd.runtime.model_runner import is_device_error
from inflightd.tokenizer.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # loads the default model

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer(default_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf)


class ScriptedRunner:
    """Greedy "model": each sampled token is a function of the chunk's last token and position.
    `fail` decides, per step number (from 1), whether that step raises; `gate`, when set, must
    be released once per step (to hold the engine inside a step)."""

    def __init__(self, vocab: int, fail: Callable[[int], BaseException | None] = lambda n: None) -> None:
        self.vocab = vocab
        self.fail = fail
        self.steps = 0
        self.gate: threading.Semaphore | None = None
        self.released: list[int] = []

    def execute(self, chunks: list[SeqChunk], copies: list[tuple[int, int]]) -> torch.Tensor:
        if self.gate is not None:
            self.gate.acquire()
        self.steps += 1
        exc = self.fail(self.steps)
        if exc is not None:
            raise exc
        sampled = [c for c in chunks if c.sample]
        logits = torch.zeros(len(sampled), self.vocab)
        for row, c in enumerate(sampled):
            pos = c.start_pos + len(c.token_ids)
            logits[row, 1000 + zlib.crc32(f"{c.token_ids[-1]}:{pos}".encode()) % 1000] = 10.0
        return logits

    def release(self, seq_id: int) -> None:
        self.released.append(seq_id)


class Collector:
    """Sinks that gather each request's outputs and signal its terminal one."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[EngineOutput]] = {}
        self._done: dict[str, threading.Event] = {}

    def sink(self, rid: str) -> Callable[[EngineOutput], None]:
        self.outputs[rid] = []
        self._done[rid] = threading.Event()

        def sink(o: EngineOutput) -> None:
            self.outputs[rid].append(o)
            if o.finished:
                self._done[rid].set()

        return sink

    def final(self, rid: str, timeout: float = 30.0) -> EngineOutput:
        assert self._done[rid].wait(timeout), f"{rid}: no terminal output"
        outs = self.outputs[rid]
        assert sum(o.finished for o in outs) == 1 and outs[-1].finished
        return outs[-1]

    def wait_tokens(self, rid: str, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.tokens(rid)) < n:
            assert time.monotonic() < deadline, f"{rid}: fewer than {n} tokens"
            time.sleep(0.001)

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs[rid] for t in o.token_ids]


def make_engine(
    tokenizer: Tokenizer, runner: ScriptedRunner, *, num_blocks: int = 64, clock: Callable[[], float] | None = None,
    is_fatal: Callable[[BaseException], bool] = is_device_error, **cfg: object,
) -> Engine:
    cfg.setdefault("max_queue_delay_ms", 0)
    limits = RequestLimits(**{k: cfg.pop(k) for k in ("max_model_len", "queue_timeout_s") if k in cfg})  # type: ignore[arg-type]
    bm = BlockManager(num_blocks, 4)
    kw = {} if clock is None else {"clock": clock}
    sched = Scheduler(SchedulerConfig(**cfg), bm, limits=limits, **kw)  # type: ignore[arg-type]
    engine = Engine(runner, sched, tokenizer, is_fatal=is_fatal, **kw)  # type: ignore[arg-type]
    engine.start()
    return engine


def prompt(i: int, n: int = 10) -> list[int]:
    return [(i * 7919 + k * 31) % 900 + 100 for k in range(n)]


def settle(engine: Engine) -> None:
    """Wait for the step boundary that frees what the last step released."""
    collector = Collector()
    engine.add_request("settle", [5], SamplingParams(max_tokens=1, temperature=0.0), collector.sink("settle"))
    collector.final("settle")


def assert_clean(engine: Engine) -> None:
    settle(engine)
    bm = engine.scheduler.block_manager
    bm.integrity_check()
    assert engine.num_unfinished == 0 and not engine.scheduler.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks


# ------------------------------------------------------------------------------ all or nothing
def test_refused_request_leaves_no_state(tokenizer: Tokenizer) -> None:
    runner = ScriptedRunner(tokenizer.vocab_size)
    engine = make_engine(tokenizer, runner, max_model_len=64)
    c = Collector()
    vocab = tokenizer.vocab_size
    refusals = [
        ("vocab", prompt(0), SamplingParams(max_tokens=4, stop_token_ids=(vocab,)), SamplingParamsError),
        ("bias", prompt(0), SamplingParams(max_tokens=4, logit_bias={vocab + 5: 1.0}), SamplingParamsError),
        ("ids", [1, tokenizer.vocab_size], GREEDY, ValueError),
        ("long", prompt(0, 60), SamplingParams(max_tokens=10), ValueError),
        ("empty", [], GREEDY, ValueError),
    ]
    for rid, ids, params, error in refusals:
        with pytest.raises(error):
            engine.add_request(rid, ids, params, c.sink(rid))
        assert engine.num_unfinished == 0 and engine.scheduler.num_waiting == 0
        assert not c.outputs[rid]
    # the refused ids are free to use, and the engine serves as before
    engine.add_request("vocab", prompt(1), GREEDY, c.sink("vocab"))
    assert c.final("vocab").finish_reason == "length" and len(c.tokens("vocab")) == 6
    assert runner.steps > 0
    assert_clean(engine)
    engine.shutdown()


def test_out_of_range_values_are_refused_by_name() -> None:
    """What used to be queued and then fail a step (torch's "Overflow when unpacking long
    long") or overflow the sampler is refused when the parameters are built."""
    for kwargs, name in [
        ({"seed": -(1 << 63) - 1}, "seed"), ({"seed": 1 << 64}, "seed"),
        ({"repetition_penalty": 1e-308}, "repetition_penalty"), ({"temperature": 10**400}, "temperature"),
        ({"temperature": 1e309}, "temperature"), ({"top_p": 10**400}, "top_p"),
    ]:
        with pytest.raises(SamplingParamsError, match=f"^{name}:"):
            SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert SamplingParams(seed=(1 << 64) - 1).seed == (1 << 64) - 1
    assert SamplingParams(seed=-(1 << 63)).seed == -(1 << 63)
    # a temperature too small to divide by is greedy, not a division by ~0
    assert SamplingParams(temperature=1e-308).greedy


# ------------------------------------------------------------------------------ step failures
def test_failed_step_fails_only_its_requests(tokenizer: Tokenizer) -> None:
    """max_num_seqs 1: "a" runs alone when step 3 fails; "b" waits meanwhile, is not part of
    that step, and then completes exactly as it would have."""
    expected = {}
    clean = ScriptedRunner(tokenizer.vocab_size)
    engine = make_engine(tokenizer, clean, max_num_seqs=1)
    c = Collector()
    engine.add_request("b", prompt(2), GREEDY, c.sink("b"))
    c.final("b")
    expected["b"] = c.tokens("b")
    engine.shutdown()

    runner = ScriptedRunner(tokenizer.vocab_size, fail=lambda n: RuntimeError("boom") if n == 3 else None)
    runner.gate = threading.Semaphore(0)
    engine = make_engine(tokenizer, runner, max_num_seqs=1)
    c = Collector()
    engine.add_request("a", prompt(1), GREEDY, c.sink("a"))
    runner.gate.release()  # step 1: "a"'s prefill
    engine.add_request("b", prompt(2), GREEDY, c.sink("b"))
    for _ in range(200):
        runner.gate.release()
    end = c.final("a")
    assert end.finish_reason == "abort" and end.error is not None and "boom" in end.error
    assert not end.overloaded and len(c.tokens("a")) == 2  # the tokens of steps 1 and 2 came through
    assert c.final("b").finish_reason == "length" and c.tokens("b") == expected["b"]
    assert engine.error is None
    assert_clean(engine)
    engine.shutdown()


def test_failed_prefill_leaves_nothing_in_the_prefix_cache(tokenizer: Tokenizer) -> None:
    """The blocks a failed step was filling were registered for prefix reuse when their slots
    were handed out; their K/V were never written, so no later prompt may hit them."""
    long = prompt(3, 24)  # 6 full blocks of 4
    runner = ScriptedRunner(tokenizer.vocab_size, fail=lambda n: RuntimeError("boom") if n == 1 else None)
    engine = make_engine(tokenizer, runner)
    c = Collector()
    engine.add_request("first", long, GREEDY, c.sink("first"))
    assert c.final("first").error is not None
    engine.add_request("again", long, GREEDY, c.sink("again"))
    assert c.final("again").finish_reason == "length"
    assert c.outputs["again"][0].cached_tokens == 0
    engine.add_request("third", long, GREEDY, c.sink("third"))  # the control: now it is cached
    assert c.final("third").finish_reason == "length" and c.outputs["third"][0].cached_tokens == 20
    assert c.tokens("third") == c.tokens("again")
    assert_clean(engine)
    engine.shutdown()


def test_fatal_error_stops_the_engine(tokenizer: Tokenizer) -> None:
    runner = ScriptedRunner(
        tokenizer.vocab_size,
        fail=lambda n: RuntimeError("CUDA error: an illegal memory access was encountered") if n == 2 else None,
    )
    engine = make_engine(tokenizer, runner, max_num_seqs=1)
    errors: list[BaseException] = []
    engine.on_error = errors.append
    c = Collector()
    engine.add_request("a", prompt(1), GREEDY, c.sink("a"))
    engine.add_request("b", prompt(2), GREEDY, c.sink("b"))  # waiting: failed too
    for rid in ("a", "b"):
        assert "illegal memory access" in (c.final(rid).error or "")
    assert engine.error is not None and errors == [engine.error]
    with pytest.raises(RuntimeError, match="has failed"):
        engine.add_request("c", prompt(3), GREEDY, c.sink("c"))
    engine.shutdown()


def test_repeated_step_failures_are_fatal(tokenizer: Tokenizer) -> None:
    runner = ScriptedRunner(tokenizer.vocab_size, fail=lambda n: ValueError("always"))
    engine = make_engine(tokenizer, runner)
    c = Collector()
    for i in range(MAX_FAILED_STEPS):
        engine.add_request(f"r{i}", prompt(i), GREEDY, c.sink(f"r{i}"))
        assert "always" in (c.final(f"r{i}").error or "")
    assert engine.error is not None and runner.steps == MAX_FAILED_STEPS
    engine.shutdown()


def test_device_errors_are_fatal_others_are_not() -> None:
    assert is_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_device_error(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"))
    assert not is_device_error(RuntimeError("shape mismatch"))
    assert not is_device_error(MemoryError())


# ------------------------------------------------------------------------------ queue timeout
def test_queue_timeout_with_a_fake_clock(tokenizer: Tokenizer) -> None:
    """Triton's queue policy (timeout → REJECT): "b" and "c" wait behind "a" (max_num_seqs 1);
    once the clock passes queue_timeout_s, both leave the queue with an "overloaded" error and
    hold nothing; "a" runs on, and a request that arrives after them is served."""
    now = [1000.0]
    runner = ScriptedRunner(tokenizer.vocab_size)
    runner.gate = threading.Semaphore(0)
    engine = make_engine(tokenizer, runner, clock=lambda: now[0], max_num_seqs=1, queue_timeout_s=5.0)
    c = Collector()
    engine.add_request("a", prompt(1), GREEDY, c.sink("a"))
    runner.gate.release()
    c.wait_tokens("a", 1)  # step 1 ran; step 2 is scheduled and held at the gate
    engine.add_request("b", prompt(2), GREEDY, c.sink("b"))
    now[0] += 3.0
    engine.add_request("c", prompt(3), GREEDY, c.sink("c"))
    runner.gate.release()
    c.wait_tokens("a", 2)  # step 3 scheduled at t = 1003: nobody waited 5 s yet
    assert not c.outputs["b"] and not c.outputs["c"]
    now[0] += 2.5  # "b" has waited 5.5 s, "c" 2.5 s
    runner.gate.release()
    end = c.final("b")  # at the boundary before step 4
    assert end.overloaded and "queue_timeout_s" in (end.error or "") and not c.tokens("b")
    c.wait_tokens("a", 3)
    assert not c.outputs["c"]
    now[0] += 3.0  # "c" has waited 5.5 s
    runner.gate.release()
    assert c.final("c").overloaded
    for _ in range(100):
        runner.gate.release()
    assert c.final("a").finish_reason == "length"
    engine.add_request("d", prompt(4), GREEDY, c.sink("d"))
    assert c.final("d").finish_reason == "length"
    assert engine.scheduler.stats.num_expired == 2
    assert_clean(engine)
    engine.shutdown()
