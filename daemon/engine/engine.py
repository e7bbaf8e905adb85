"""The in-flight engine: owns the step loop on a dedicated thread.

    schedule (scheduler) → run the model (runner) → sample → update (scheduler) → emit outputs

Why a thread and not a process: torch and the Numba kernels release the GIL for the heavy
work, so the asyncio loop stays responsive, and a thread avoids serialising every step's
outputs across a process boundary (with only two cores here, a second process would compete
for them). Nothing in this module knows about HTTP or msgpack.

Threading contract: every call into the scheduler happens under `self._cond`'s lock. Clients
call `add_request` / `abort` from any thread; the step loop takes the lock only to schedule and
to record a step's tokens, never while the model runs. When there is nothing to do the loop
blocks on the condition (woken by a new request, an abort or shutdown; with a timeout only while
the queue-delay window holds a request back): no polling. Outputs go to each request's sink,
called on the engine thread; an asyncio server wraps `loop.call_soon_threadsafe`.

Requests are checked whole before anything is queued (`add_request` is all or nothing), so no
request can fail a step. When a step fails anyway, only that step's requests end (each with an
error output; the blocks the step was writing leave the prefix cache) and the loop goes on.
It stops, failing everything in flight and calling `on_error`, when the error is fatal (the
`is_fatal` the runtime passes: a poisoned CUDA context does not heal) or when
`MAX_FAILED_STEPS` steps fail in a row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..checks import is_int
from ..tokenizer.tokenizer import IncrementalDetokenizer, Tokenizer
from .outputs import EngineOutput, EngineSnapshot, Sink, StepStats, Timing, Usage
from .runner import Runner
from .sampling import Sampler, make_generator
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .scheduler_config import RequestLimits, SchedulerConfig
from .sequence import FinishReason, Sequence

log = logging.getLogger(__name__)

# Steps that may fail in a row before the engine counts itself broken (is_fatal aside).
MAX_FAILED_STEPS = 3


@dataclass
class _Request:
    request_id: str
    seq: Sequence
    params: SamplingParams
    sink: Sink
    generator: torch.Generator
    detok: IncrementalDetokenizer
    stop_ids: frozenset[int]
    text: str = ""  # decoded so far, stop strings not yet ruled out included
    emitted: int = 0  # characters of `text` already sent
    done: bool = False


class Engine:
    def __init__(
        self,
        runner: Runner,
        scheduler: Scheduler,
        tokenizer: Tokenizer,
        *,
        clock: Callable[[], float] = time.monotonic,
        is_fatal: Callable[[BaseException], bool] = lambda exc: False,
    ) -> None:
        """`is_fatal(exc)`: whether a step's exception means the device cannot go on (the
        engine then stops); otherwise only that step's requests fail."""
        self.runner = runner
        self.is_fatal = is_fatal
        self._failed_steps = 0  # in a row
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.clock = clock
        self.sampler = Sampler()
        self.stats = StepStats()
        self.error: BaseException | None = None
        # Called on the engine thread once a step has failed and the requests in flight have
        # had their terminal outputs (the daemon exits non-zero: a poisoned CUDA context does
        # not heal, and systemd restarts a dead service, not one that serves errors).
        self.on_error: Callable[[BaseException], None] | None = None
        self.last_progress = clock()  # for a watchdog: advances with every step
        self._cond = threading.Condition()
        self._requests: dict[int, _Request] = {}
        self._ids: dict[str, int] = {}
        self._next_seq_id = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------ client side
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="inflightd-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the loop after the current step; unfinished requests get an abort."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sink: Sink, *, priority: int = 0
    ) -> None:
        """Queue a request, all or nothing: everything the steps will need is built and checked
        first, so that a request that is refused leaves no state and one that is queued cannot
        fail a step. Raises (nothing queued) for a full queue (QueueFullError), a prompt +
        max_tokens over the limits (RequestTooLongError), token ids outside the vocabulary or a
        duplicate id (ValueError), or a dead engine (RuntimeError)."""
        if not prompt_token_ids:
            raise ValueError("empty prompt: nothing to condition on")
        vocab = self.tokenizer.vocab_size
        bad = [t for t in prompt_token_ids if not (is_int(t) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        params.check_vocab(vocab)
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.tokenizer.eos_token_ids
        )
        generator = make_generator(params)
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
        with self._cond:
            if self.error is not None:
                raise RuntimeError(f"the engine has failed: {self.error}")
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            if request_id in self._ids:
                raise ValueError(f"request id {request_id!r} is already in flight")
            seq = Sequence(
                self._next_seq_id, list(prompt_token_ids), params.max_tokens, priority, arrival_time=self.clock()
            )
            self.scheduler.add(seq)  # the last thing that may raise: then nothing was queued
            self._next_seq_id += 1
            self._requests[seq.seq_id] = _Request(request_id, seq, params, sink, generator, detok, stop_ids)
            self._ids[request_id] = seq.seq_id
            self._cond.notify()

    def abort(self, request_id: str) -> bool:
        """Abort a request in any state; its sink gets a final "abort" output and its blocks
        are free by the next step. False when it is unknown or already finished."""
        with self._cond:
            seq_id = self._ids.get(request_id)
            if seq_id is None or self.scheduler.abort(seq_id) is None:
                return False
            self._cond.notify()
            return True

    def update_config(self, config: SchedulerConfig, limits: RequestLimits | None = None) -> None:
        """Live reload (from the next step); ValueError, changing nothing, when they clash."""
        with self._cond:
            self.scheduler.update_config(config, limits)
            self._cond.notify()

    def snapshot(self) -> EngineSnapshot:
        """A consistent view of the queues and the KV cache, for /metrics and /v1/status."""
        with self._cond:
            bm = self.scheduler.block_manager
            st = self.scheduler.stats
            return EngineSnapshot(
                num_waiting=self.scheduler.num_waiting,
                num_running=self.scheduler.num_running,
                num_blocks=bm.num_blocks,
                num_free_blocks=bm.num_free_blocks,
                prefix_query_tokens=bm.num_prefix_query_tokens,
                prefix_hit_tokens=bm.num_prefix_hit_tokens,
                num_preemptions=st.num_preemptions,
                steps=self.stats.steps,
                last_progress=self.last_progress,
                config=self.scheduler.next_config,
                limits=self.scheduler.next_limits,
            )

    @property
    def num_unfinished(self) -> int:
        with self._cond:
            return len(self._requests)

    # -------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    out = self._next_step()
                    if out is None:
                        break
                try:
                    self._run_step(out)
                except Exception as exc:
                    self._failed_steps += 1
                    if self.is_fatal(exc) or self._failed_steps >= MAX_FAILED_STEPS:
                        raise
                    self._fail_step(out, exc)
                else:
                    self._failed_steps = 0
        except BaseException as exc:  # fatal: fail what is in flight, then stop the engine
            log.exception("engine step failed (fatal)")
            with self._cond:
                self.error = exc
                reqs = list(self._requests.values())
                self._requests.clear()
                self._ids.clear()
            for r in reqs:
                self._finish_output(r, FinishReason.ABORT, error=f"engine failure: {exc}")
            if self.on_error is not None:
                self.on_error(exc)
            return
        with self._cond:
            reqs = list(self._requests.values())
            for r in reqs:
                self.scheduler.abort(r.seq.seq_id)
        for r in reqs:
            self._finish_output(r, FinishReason.ABORT)

    def _fail_step(self, out: SchedulerOutput, exc: Exception) -> None:
        """A step raised: end its requests with an error, and with them any request that shares
        a block the step was writing (a prefix hit in the same step); those blocks leave the
        prefix cache. The other requests go on at the next step."""
        log.error("engine step failed; failing its %d request(s)", len(out.chunks), exc_info=exc)
        bm = self.scheduler.block_manager
        written = {slot // bm.block_size for c in out.chunks for slot in c.slots if slot >= 0}
        written.update(dst for _, dst in out.copies)
        with self._cond:
            bm.invalidate(written)
            victims = {c.seq_id for c in out.chunks}
            for seq_id in self._requests:
                if seq_id not in victims and seq_id in bm and not written.isdisjoint(bm.block_table(seq_id)):
                    victims.add(seq_id)
            failed = []
            for seq_id in victims:
                r = self._requests.pop(seq_id, None)
                if r is None:
                    continue  # finished within the step before it failed
                self._ids.pop(r.request_id, None)
                self.scheduler.abort(seq_id)  # blocks freed at the next boundary
                failed.append(r)
            self.last_progress = self.clock()
        for r in failed:
            self._finish_output(r, FinishReason.ABORT, error=f"engine step failed: {exc}")

    def _next_step(self) -> SchedulerOutput | None:
        """Under the lock: block until there is a step to run (None: shutting down)."""
        while not self._stopping:
            out = self.scheduler.schedule()
            self._release(out.aborted)
            self._expire(out.expired)
            if not out.is_empty:
                return out
            # idle, or the delay window holds requests back: sleep until woken or it ends
            self._cond.wait(out.wait_s)
        return None

    def _release(self, aborted: list[Sequence]) -> None:
        for seq in aborted:
            self.runner.release(seq.seq_id)
            r = self._requests.pop(seq.seq_id, None)
            if r is not None:
                self._ids.pop(r.request_id, None)
                # the sink runs on this thread under the lock: sinks must not block
                self._finish_output(r, FinishReason.ABORT)

    def _expire(self, expired: list[Sequence]) -> None:
        timeout = self.scheduler.limits.queue_timeout_s
        for seq in expired:
            self.runner.release(seq.seq_id)
            r = self._requests.pop(seq.seq_id, None)
            if r is not None:
                self._ids.pop(r.request_id, None)
                self._finish_output(
                    r, FinishReason.ABORT, overloaded=True,
                    error=f"the request waited over {timeout:g} s in the queue (limits.queue_timeout_s)",
                )

    def _run_step(self, out: SchedulerOutput) -> None:
        t0 = time.perf_counter()
        sampled_chunks = [c for c in out.chunks if c.sample]
        logits = self.runner.execute(out.chunks, out.copies)
        t1 = time.perf_counter()
        with self._cond:
            reqs = [self._requests.get(c.seq_id) for c in sampled_chunks]
        live = [(i, r) for i, r in enumerate(reqs) if r is not None]
        tokens: dict[int, int] = {}
        result = None
        if live:
            rows = torch.tensor([i for i, _ in live])
            result = self.sampler(
                logits[rows],
                [r.params for _, r in live],
                [r.generator for _, r in live],
                [r.seq.prompt_token_ids for _, r in live],
                [r.seq.output_token_ids for _, r in live],
            )
            tokens = {r.seq.seq_id: t for (_, r), t in zip(live, result.token_ids)}
        emits: list[tuple[_Request, EngineOutput]] = []
        try:
            with self._cond:
                self.scheduler.on_step_done(out, tokens)
                for j, (_, r) in enumerate(live):
                    if r.seq.is_finished:  # aborted while the model ran: its token was dropped
                        continue
                    emit = self._process_token(r, tokens[r.seq.seq_id], result, j)
                    if emit is not None:
                        emits.append((r, emit))
                now = self.clock()
                self.last_progress = now
        finally:  # a request finished above is gone from _requests: its output must go out
            for r, e in emits:
                r.sink(e)
        t2 = time.perf_counter()
        s = self.stats
        s.steps += 1
        s.tokens += out.num_batched_tokens
        s.model_s += t1 - t0
        s.step_s += t2 - t0
        s.recent.append((t2, len(out.chunks), out.num_batched_tokens, t1 - t0, t2 - t0))

    def _process_token(self, r: _Request, tok: int, result: object, j: int) -> EngineOutput | None:
        """Under the lock, after `on_step_done` appended `tok`: detokenize, check stops, and
        return the delta for the sink (None when nothing new can be shown yet)."""
        p, seq = r.params, r.seq
        reason: FinishReason | None = None
        if tok in r.stop_ids:
            reason = FinishReason.STOP
            r.text += r.detok.flush()
        else:
            before = len(r.text)
            r.text += r.detok.add(tok)
            if p.stop:
                # a stop string may straddle tokens: search only where it could end now
                start = max(0, before - max(len(x) for x in p.stop) + 1)
                hits = [i for i in (r.text.find(x, start) for x in p.stop) if i >= 0]
                if hits:
                    r.text = r.text[: min(hits)]
                    reason = FinishReason.STOP
            if reason is None and len(seq.output_token_ids) >= p.max_tokens:
                reason = FinishReason.LENGTH
                r.text += r.detok.flush()
        lp = getattr(result, "logprobs", None)
        top = getattr(result, "top_logprobs", None)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.runner.release(seq.seq_id)
            self._requests.pop(seq.seq_id, None)
            self._ids.pop(r.request_id, None)
            return self._final(r, reason, [tok], lp[j : j + 1] if lp else None, top[j : j + 1] if top else None)
        # hold back text that might still turn out to start a stop string
        hold = max((len(x) for x in p.stop), default=1) - 1
        upto = max(r.emitted, len(r.text) - hold)
        delta = r.text[r.emitted : upto]
        r.emitted = upto
        return EngineOutput(
            r.request_id,
            [tok],
            delta,
            logprobs=lp[j : j + 1] if lp else None,
            top_logprobs=top[j : j + 1] if top else None,
            cached_tokens=seq.num_cached_tokens,
        )

    def _final(
        self,
        r: _Request,
        reason: FinishReason,
        token_ids: list[int],
        logprobs: list[float] | None = None,
        top: list[list[tuple[int, float]]] | None = None,
        error: str | None = None,
        overloaded: bool = False,
    ) -> EngineOutput:
        r.done = True
        seq = r.seq
        now = self.clock()
        first_sched = seq.first_scheduled_time if seq.first_scheduled_time is not None else now
        first_tok = seq.first_token_time
        n = len(seq.output_token_ids)
        timing = Timing(
            queue_ms=(first_sched - seq.arrival_time) * 1e3,
            ttft_ms=((first_tok if first_tok is not None else now) - seq.arrival_time) * 1e3,
            tpot_ms=((now - first_tok) / (n - 1) * 1e3) if first_tok is not None and n > 1 else 0.0,
        )
        usage = Usage(len(seq.prompt_token_ids), n, seq.num_cached_tokens)
        text = r.text[r.emitted :]
        r.emitted = len(r.text)
        return EngineOutput(
            r.request_id, token_ids, text, True, reason, usage, timing, logprobs, top, error,
            seq.num_cached_tokens, overloaded,
        )

    def _finish_output(
        self, r: _Request, reason: FinishReason, error: str | None = None, overloaded: bool = False
    ) -> None:
        if r.done:
            return
        r.sink(self._final(r, reason, [], error=error, overloaded=overloaded))
