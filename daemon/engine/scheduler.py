"""In-flight batching: which sequences run each step, and which of their tokens.

Pure Python (no torch): it drives `block_manager.BlockManager` and hands the model runner one
`SeqChunk` per scheduled sequence. One step shares a token budget (`max_num_batched_tokens`)
between the running sequences' decode tokens first, then prefill chunks in policy order
(chunked prefill: a long prompt is split over steps while the others keep decoding).

The step contract, and who owns what:

    out = scheduler.schedule()            # a step boundary: frees, preemption, admission, slots
    logits = runner.execute(out.chunks, out.copies)
    scheduler.on_step_done(out, sampled)  # {seq_id: token} for each chunk with `sample`
    scheduler.finish(seq, reason)         # for each sequence the engine decides is done

The scheduler owns every field of a `Sequence` it holds (status, `num_computed_tokens`,
`output_token_ids`, the timestamps, `num_preemptions`); the engine only reads them, and owns
the decision that a sequence is finished (stop tokens, stop strings, max_tokens), which it
reports through `finish`. `num_computed_tokens` advances when a chunk is scheduled (its K/V are
"being computed"), and the sampled token is appended by `on_step_done`.

Blocks are never freed while a step is in flight (between `schedule` and `on_step_done`): the
block manager registers a block in the prefix cache as soon as its last slot is reserved, so
a block freed before the step writes it could be hit by another sequence. A sequence aborted
or finished during a step is released at the next boundary; its sampled token is dropped.

Not thread-safe: the engine's step loop owns it; aborts from other threads go through the
engine.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .block_manager import BlockManager
from .scheduler_config import QueueFullError, RequestLimits, RequestTooLongError, SchedulerConfig
from .sequence import FinishReason, SeqChunk, Sequence, SequenceStatus

log = logging.getLogger(__name__)

# The delay window counts as over within this much of its end, so that a float rounding
# residue never asks the engine to wait 1e-15 s (or a fake clock to loop forever).
_CLOCK_EPS = 1e-9


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's plan.

    - `chunks`: decode chunks first (one token each, always sampled), then prefill chunks.
    - `copies`: copy-on-write `(src_block, dst_block)` pairs to perform, in order, before the
      step's cache writes.
    - `preempted`: sequences preempted at this boundary (back in the waiting queue).
    - `aborted`: sequences aborted since the previous `schedule()`, in any state; none of them
      holds blocks any more.
    - `wait_s`: set only when no chunk can run now but a request held by the delay window
      becomes admissible after that many seconds; the engine waits that long (or until a new
      request or an abort wakes it) and calls `schedule()` again. None with chunks, or idle.
    - `expired`: sequences taken out of the waiting queue at this boundary because they waited
      longer than `queue_timeout_s` without being admitted (FINISHED, holding no blocks).
    """

    chunks: list[SeqChunk]
    copies: list[tuple[int, int]]
    preempted: list[Sequence]
    aborted: list[Sequence]
    num_batched_tokens: int
    wait_s: float | None = None
    expired: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class SchedulerStats:
    """Counters since start, for /metrics and /v1/status."""

    num_preemptions: int = 0
    num_rejected_queue_full: int = 0
    num_rejected_too_long: int = 0
    num_expired: int = 0  # taken out of the queue after queue_timeout_s


class Scheduler:
    """Waiting and running queues over one `BlockManager`; see the module doc for the step
    contract. `clock` (seconds, monotonic) stamps the delay window, `first_scheduled_time` and
    `first_token_time`: stamp `Sequence.arrival_time` with the same clock."""

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        clock: Callable[[], float] = time.monotonic,
        limits: RequestLimits | None = None,
    ) -> None:
        limits = limits or RequestLimits()
        limits.check(config)
        self._config = config
        self._limits = limits
        self._next: tuple[SchedulerConfig, RequestLimits] | None = None
        self.block_manager = block_manager
        self.clock = clock
        # Both kept sorted by _key: the head of _waiting is admitted first, the tail of
        # _running is preempted first.
        self._waiting: list[Sequence] = []
        self._running: list[Sequence] = []
        self._seqs: dict[int, Sequence] = {}  # every unfinished sequence, waiting or running
        self._arrival: dict[int, int] = {}  # arrival order: the FCFS tie-breaker
        self._enqueued_at: dict[int, float] = {}  # clock at add(), for the delay window
        self._next_arrival = 0
        self._aborted: list[Sequence] = []  # since the last schedule()
        self._to_free: list[int] = []  # released during the step in flight
        self._in_flight: SchedulerOutput | None = None
        self._stats = SchedulerStats()

    # ---- config and views -----------------------------------------------------------------

    @property
    def config(self) -> SchedulerConfig:
        """The config in force (a pending `update_config` applies at the next `schedule`)."""
        return self._config

    @property
    def limits(self) -> RequestLimits:
        """The request limits in force."""
        return self._limits

    @property
    def next_config(self) -> SchedulerConfig:
        """The config from the next `schedule()` on: a pending `update_config`, else the one in
        force. What a reload reports as applied."""
        return self._next[0] if self._next is not None else self._config

    @property
    def next_limits(self) -> RequestLimits:
        """The request limits from the next `schedule()` on (and for `add` at once)."""
        return self._next[1] if self._next is not None else self._limits

    def update_config(self, config: SchedulerConfig, limits: RequestLimits | None = None) -> None:
        """Live reload: `config` (and `limits`, when given) apply from the next `schedule()`;
        raises ValueError, changing nothing, when the two do not fit together. Nothing in flight
        is lost: running sequences beyond a lowered `max_num_seqs` keep running, queued
        requests beyond a lowered `max_waiting` or `max_model_len` stay queued; new limits bind
        new requests."""
        limits = limits or self.next_limits
        limits.check(config)
        self._next = (config, limits)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def stats(self) -> SchedulerStats:
        """A snapshot of the counters."""
        return replace(self._stats)

    def get(self, seq_id: int) -> Sequence | None:
        """The unfinished sequence with this id, if any."""
        return self._seqs.get(seq_id)

    def has_unfinished(self) -> bool:
        """Whether `schedule()` has anything to do: sequences waiting or running, or aborts
        and releases not yet completed at a boundary."""
        return bool(self._seqs or self._aborted or self._to_free)

    # ---- requests in and out --------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Validate and enqueue a new sequence (status WAITING, no outputs).

        Raises `RequestTooLongError` when prompt + max_tokens exceeds `max_model_len` or could
        never fit the whole KV cache, `QueueFullError` when `max_waiting` requests wait,
        `ValueError` for an empty prompt, max_tokens < 1 or a seq_id in use. Limits are those of
        the newest config, even before it is in force.
        """
        cfg, limits = self.next_config, self.next_limits
        sid = seq.seq_id
        if sid in self._seqs or sid in self.block_manager:
            raise ValueError(f"sequence {sid} is already scheduled or still holds KV blocks")
        if seq.status is not SequenceStatus.WAITING or seq.output_token_ids or seq.num_computed_tokens:
            raise ValueError(f"sequence {sid} is not new (status {seq.status.value})")
        n, m = len(seq.prompt_token_ids), seq.max_tokens
        if n == 0:
            raise ValueError(f"sequence {sid}: empty prompt")
        if m < 1:
            raise ValueError(f"sequence {sid}: max_tokens must be ≥ 1, got {m}")
        if n + m > limits.max_model_len:
            self._stats.num_rejected_too_long += 1
            raise RequestTooLongError(
                f"prompt ({n} tokens) + max_tokens ({m}) = {n + m} tokens exceeds the "
                f"context limit max_model_len ({limits.max_model_len})",
                prompt_tokens=n, max_tokens=m, limit=limits.max_model_len,
            )
        bm = self.block_manager
        capacity = bm.num_blocks * bm.block_size
        if self._blocks_for(n + m - 1) > bm.num_blocks:  # the last sampled token is never cached
            self._stats.num_rejected_too_long += 1
            raise RequestTooLongError(
                f"prompt ({n} tokens) + max_tokens ({m}) = {n + m} tokens exceeds the KV cache "
                f"capacity ({capacity} tokens: {bm.num_blocks} blocks of {bm.block_size})",
                prompt_tokens=n, max_tokens=m, limit=capacity,
            )
        if len(self._waiting) >= cfg.max_waiting:
            self._stats.num_rejected_queue_full += 1
            raise QueueFullError(len(self._waiting), cfg.max_waiting)
        self._seqs[sid] = seq
        self._arrival[sid] = self._next_arrival
        self._next_arrival += 1
        self._enqueued_at[sid] = self.clock()
        bisect.insort(self._waiting, seq, key=self._key)

    def abort(self, seq_id: int) -> Sequence | None:
        """Abort an unfinished sequence in any state; return it, or None when there is none.

        It is marked FINISHED / ABORT at once and reported in the next `schedule()`'s
        `aborted`. A waiting sequence holds no blocks; a running one's are freed at once
        between steps, else at the next boundary (`on_step_done` or `schedule`).
        """
        seq = self._seqs.get(seq_id)
        if seq is None:
            return None
        self._remove(seq, FinishReason.ABORT)
        self._aborted.append(seq)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """The engine ends a sequence (after `on_step_done` appended the token that ends it).
        Its blocks are freed as in `abort`. A no-op for a sequence already finished (an abort
        may have come first)."""
        if seq.is_finished:
            return
        if self._seqs.get(seq.seq_id) is not seq:
            raise ValueError(f"sequence {seq.seq_id} is not held by this scheduler")
        self._remove(seq, reason)

    # ---- the step -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plan the next step (a boundary: the previous step is over).

        In order: release what was aborted or finished during the last step, apply a pending
        config, give each decoding sequence its next slot (preempting if the cache is full),
        continue started prefills, then admit waiting sequences while budget, `max_num_seqs`
        and the cache allow, subject to the delay window when nothing was running.
        """
        self._end_step()
        if self._next is not None:
            self._apply_config(*self._next)
        aborted, self._aborted = self._aborted, []
        expired = self._expire()
        chunks: list[SeqChunk] = []
        preempted: list[Sequence] = []
        idle = not self._running
        budget = self._config.max_num_batched_tokens
        budget = self._schedule_decodes(chunks, preempted, budget)
        for seq in list(self._running):
            if budget == 0:
                break
            if seq.is_prefilling:
                budget -= self._schedule_prefill(seq, budget, chunks)
        wait_s = None
        if not preempted:  # no admission in a step short of blocks: it would only thrash
            budget, wait_s = self._admit(chunks, budget, idle)
        out = SchedulerOutput(
            chunks=chunks,
            copies=self.block_manager.take_pending_copies(),
            preempted=preempted,
            aborted=aborted,
            num_batched_tokens=self._config.max_num_batched_tokens - budget,
            wait_s=None if chunks else wait_s,
            expired=expired,
        )
        if chunks:
            self._in_flight = out
        return out

    def on_step_done(self, out: SchedulerOutput, sampled: dict[int, int]) -> None:
        """Record a finished step: append `sampled[seq_id]` to each sampled chunk's sequence
        (stamping `first_token_time` on its first), then release what was aborted or finished
        during the step. Sequences aborted or finished meanwhile are skipped; any other
        sampled chunk without a token is a `ValueError`."""
        if not out.chunks:
            return
        if out is not self._in_flight:
            raise ValueError("on_step_done for a step that is not the one in flight")
        live = [
            seq for chunk in out.chunks
            if chunk.sample and (seq := self._seqs.get(chunk.seq_id)) is not None
            and seq.status is SequenceStatus.RUNNING
        ]
        missing = [seq.seq_id for seq in live if seq.seq_id not in sampled]
        if missing:  # checked first, so that a bad call changes nothing
            raise ValueError(f"no sampled token for sequences {missing}")
        now = self.clock()
        for seq in live:
            seq.output_token_ids.append(sampled[seq.seq_id])
            if seq.first_token_time is None:
                seq.first_token_time = now
        self._end_step()

    # ---- internals ------------------------------------------------------------------------

    def _key(self, seq: Sequence) -> tuple[int, int]:
        priority = seq.priority if self._config.policy == "priority" else 0
        return (priority, self._arrival[seq.seq_id])

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_manager.block_size)

    def _apply_config(self, config: SchedulerConfig, limits: RequestLimits) -> None:
        old, self._config, self._limits, self._next = self._config, config, limits, None
        if config.policy != old.policy:
            self._waiting.sort(key=self._key)
            self._running.sort(key=self._key)

    def _remove(self, seq: Sequence, reason: FinishReason) -> None:
        sid = seq.seq_id
        if seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
            if self._in_flight is None:
                self.block_manager.free(sid)
            else:
                self._to_free.append(sid)
        else:
            self._waiting.remove(seq)
        del self._seqs[sid], self._arrival[sid], self._enqueued_at[sid]
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _expire(self) -> list[Sequence]:
        """Take out the never-admitted sequences that waited past `queue_timeout_s`."""
        timeout = self._limits.queue_timeout_s
        if timeout <= 0 or not self._waiting:
            return []
        deadline = self.clock() - timeout
        expired = [
            s for s in self._waiting
            if s.first_scheduled_time is None and self._enqueued_at[s.seq_id] <= deadline + _CLOCK_EPS
        ]
        for seq in expired:
            self._remove(seq, FinishReason.ABORT)
        self._stats.num_expired += len(expired)
        return expired

    def _end_step(self) -> None:
        self._in_flight = None
        for sid in self._to_free:
            self.block_manager.free(sid)
        self._to_free.clear()

    def _schedule_decodes(self, chunks: list[SeqChunk], preempted: list[Sequence], budget: int) -> int:
        bm = self.block_manager
        queue = list(self._running)  # victims come off its tail: never one scheduled already
        i = 0
        while i < len(queue) and budget > 0:
            seq = queue[i]
            if seq.is_prefilling:
                i += 1
                continue
            if seq.num_computed_tokens != seq.num_tokens - 1:  # its last chunk's token is missing
                raise RuntimeError(
                    f"sequence {seq.seq_id} has no token sampled from its last step: "
                    "call on_step_done after every step"
                )
            while not bm.can_append(seq.seq_id, 1):
                if self._config.kv_policy == "no_evict":
                    # Only after a reload from "recompute" left the cache overcommitted, or an
                    # engine that let a sequence run past max_tokens: stalling would deadlock.
                    log.warning("no_evict: sequence %d cannot grow; preempting", seq.seq_id)
                victim = queue.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    return budget
            token = seq.output_token_ids[-1]
            slots = bm.append_slots(seq.seq_id, [token])
            chunks.append(
                SeqChunk(seq.seq_id, [token], seq.num_computed_tokens, slots, bm.block_table(seq.seq_id), True)
            )
            seq.num_computed_tokens += 1
            budget -= 1
            i += 1
        return budget

    def _schedule_prefill(self, seq: Sequence, budget: int, chunks: list[SeqChunk]) -> int:
        """Schedule the next prefill chunk of a running sequence; return its token count.

        The prefill target is the prompt, or after a preemption every token but the last
        output, which is then fed as an ordinary decode; so only a first prefill samples."""
        bm = self.block_manager
        has_outputs = bool(seq.output_token_ids)
        target = seq.num_tokens - (1 if has_outputs else 0)
        start = seq.num_computed_tokens
        n = min(budget, target - start)
        if n <= 0 or not bm.can_append(seq.seq_id, n):  # only copy-on-write could need blocks
            return 0
        slots = bm.reserve_prompt_slots(seq.seq_id, n)
        tokens = (seq.all_token_ids if has_outputs else seq.prompt_token_ids)[start : start + n]
        end = start + n
        sample = end == target and not has_outputs
        chunks.append(SeqChunk(seq.seq_id, tokens, start, slots, bm.block_table(seq.seq_id), sample))
        seq.num_computed_tokens = end
        return n

    def _delay_left(self) -> float:
        """Seconds the waiting requests may still wait for companions (nothing is running)."""
        cfg = self._config
        if cfg.max_queue_delay_ms == 0 or len(self._waiting) >= cfg.max_num_seqs:
            return 0.0
        if any(s.first_scheduled_time is not None for s in self._waiting):
            return 0.0  # a preempted sequence resumes at once
        if sum(len(s.prompt_token_ids) for s in self._waiting) >= cfg.max_num_batched_tokens:
            return 0.0  # the budget is full already
        oldest = min(self._enqueued_at[s.seq_id] for s in self._waiting)
        left = oldest + cfg.max_queue_delay_s - self.clock()
        return left if left > _CLOCK_EPS else 0.0

    def _admit(self, chunks: list[SeqChunk], budget: int, idle: bool) -> tuple[int, float | None]:
        """Admit waiting sequences in policy order, head of line first; return the budget
        left and, when the delay window holds them back, the seconds it has left."""
        cfg, bm = self._config, self.block_manager
        if idle and self._waiting:
            left = self._delay_left()
            if left > 0:
                return budget, left
        while self._waiting and budget > 0 and len(self._running) < cfg.max_num_seqs:
            seq = self._waiting[0]
            tokens = seq.all_token_ids[:-1] if seq.output_token_ids else seq.prompt_token_ids
            # Without chunked prefill a prompt waits for a step with room for all of it,
            # unless no step could hold it (a recompute, or a reload that lowered the budget).
            if not cfg.chunked_prefill and budget < min(len(tokens), cfg.max_num_batched_tokens):
                break
            if not self._kv_admits(seq, tokens):
                break
            self._waiting.pop(0)
            cached = bm.allocate(seq.seq_id, tokens)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = self.clock()
                seq.num_cached_tokens = cached
            seq.num_computed_tokens = cached
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self._running, seq, key=self._key)
            budget -= self._schedule_prefill(seq, budget, chunks)
        return budget, None

    def _kv_admits(self, seq: Sequence, tokens: list[int]) -> bool:
        bm = self.block_manager
        if self._config.kv_policy == "recompute":
            return bm.can_allocate(tokens)
        # no_evict: the blocks this sequence may ever hold, beside what the running ones may
        # still claim. Counting every block as new (ignoring prefix hits) keeps it a guarantee.
        claims = 0
        for s in self._running:
            held = self._blocks_for(max(s.num_computed_tokens, s.num_tokens - (1 if s.output_token_ids else 0)))
            claims += max(0, self._max_blocks(s) - held)
        return self._max_blocks(seq) + claims <= bm.num_free_blocks

    def _max_blocks(self, seq: Sequence) -> int:
        """Blocks the sequence holds at most: its last sampled token is never fed back."""
        return self._blocks_for(len(seq.prompt_token_ids) + seq.max_tokens - 1)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: free the blocks and requeue; the outputs are kept, and the
        prefix cache makes the recompute cheap while the freed blocks stay unevicted."""
        self._running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self._stats.num_preemptions += 1
        # Requeued whatever max_waiting says. Its arrival order puts it ahead of every request
        # of its priority that was never admitted: the head of the queue under "fcfs".
        bisect.insort(self._waiting, seq, key=self._key)
