"""Scheduler tests in the style of vLLM's: no model, a fake clock, and a fake model that keeps a
simulated KV cache (slot -> token id). Every step it writes each chunk's tokens to their slots,
then checks that each scheduled sequence's block table holds exactly its tokens at every
position the step attends to, and "samples" a token that is a hash of that cached context. So a
wrong slot, a bad prefix hit or a broken resume after preemption changes the outputs, which are
compared with a reference computed from the tokens alone."""

from __future__ import annotations

import random
from collections.abc import Sequence as Seq

import pytest

from inflightd.engine.block_manager import BlockManager
from inflightd.engine.scheduler import Scheduler, SchedulerOutput
from inflightd.engine.scheduler_config import QueueFullError, RequestLimits, RequestTooLongError, SchedulerConfig
from inflightd.engine.sequence import FinishReason, SeqChunk, Sequence, SequenceStatus

VOCAB = 1000


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def next_token(context: Seq[int]) -> int:
    return hash(tuple(context)) % VOCAB


def reference(prompt: list[int], max_tokens: int, stop: int | None = None) -> list[int]:
    """What a sequence alone outputs: each token a function of everything before it."""
    ctx, out = list(prompt), list[int]()
    while len(out) < max_tokens:
        tok = next_token(ctx)
        out.append(tok)
        ctx.append(tok)
        if stop is not None and tok % stop == 0:
            break
    return out


class FakeModel:
    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.kv: dict[int, int] = {}

    def run(self, sched: Scheduler, out: SchedulerOutput) -> dict[int, int]:
        bs = self.bm.block_size
        for src, dst in out.copies:
            for o in range(bs):
                if src * bs + o in self.kv:
                    self.kv[dst * bs + o] = self.kv[src * bs + o]
        for c in out.chunks:
            assert len(c.slots) == len(c.token_ids) > 0
            for slot, tok in zip(c.slots, c.token_ids):
                self.kv[slot] = tok
        sampled = {}
        for c in out.chunks:
            seq = sched.get(c.seq_id)
            assert seq is not None and seq.status is SequenceStatus.RUNNING
            end = c.start_pos + len(c.token_ids)
            assert seq.num_computed_tokens == end
            assert list(c.token_ids) == seq.all_token_ids[c.start_pos : end]
            context = [self.kv.get(c.block_table[p // bs] * bs + p % bs, -1) for p in range(end)]
            assert context == seq.all_token_ids[:end], f"sequence {c.seq_id}: cache holds other tokens"
            if c.sample:
                sampled[c.seq_id] = next_token(context)
        return sampled


def make_seq(seq_id: int, prompt: list[int] | int, max_tokens: int = 4, priority: int = 0) -> Sequence:
    if isinstance(prompt, int):
        prompt = [(seq_id * 7919 + i * 31) % VOCAB for i in range(prompt)]
    return Sequence(seq_id, prompt, max_tokens, priority=priority)


def make(
    num_blocks: int = 64, block_size: int = 4, clock: FakeClock | None = None, **cfg: object
) -> tuple[Scheduler, BlockManager, FakeModel]:
    cfg.setdefault("max_queue_delay_ms", 0)
    limits = {k: cfg.pop(k) for k in ("max_model_len", "queue_timeout_s") if k in cfg}
    bm = BlockManager(num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(**cfg), bm, clock or FakeClock(), RequestLimits(**limits))  # type: ignore[arg-type]
    return sched, bm, FakeModel(bm)


def step(sched: Scheduler, model: FakeModel, stop: int | None = None) -> SchedulerOutput:
    """One engine step: schedule, run, record, and finish what reached max_tokens or `stop`."""
    out = sched.schedule()
    sampled = model.run(sched, out)
    sched.on_step_done(out, sampled)
    for tok_seq_id in sampled:
        seq = sched.get(tok_seq_id)
        assert seq is not None
        if stop is not None and seq.output_token_ids[-1] % stop == 0:
            sched.finish(seq, FinishReason.STOP)
        elif len(seq.output_token_ids) >= seq.max_tokens:
            sched.finish(seq, FinishReason.LENGTH)
    sched.block_manager.integrity_check()
    return out


def run_all(sched: Scheduler, model: FakeModel, max_steps: int = 1000) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished():
        outs.append(step(sched, model))
        assert len(outs) < max_steps, "no progress"
    return outs


def kinds(out: SchedulerOutput) -> list[tuple[int, int, bool]]:
    """(seq_id, tokens, sample) of each chunk."""
    return [(c.seq_id, len(c.token_ids), c.sample) for c in out.chunks]


# ---- config and add() ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_waiting": -1}, "max_waiting"),
        ({"max_queue_delay_ms": -1}, "max_queue_delay_ms"),
        ({"max_queue_delay_ms": float("nan")}, "max_queue_delay_ms"),
        ({"policy": "lifo"}, "policy"),
        ({"kv_policy": "swap"}, "kv_policy"),
        ({"max_num_seqs": 64, "max_num_batched_tokens": 32}, "max_num_batched_tokens: must be ≥ max_num_seqs (64)"),
        ({"chunked_prefill": False, "max_model_len": 4096, "max_num_batched_tokens": 2048}, "chunked_prefill"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"queue_timeout_s": -1}, "queue_timeout_s"),
    ],
)
def test_config_validation(kwargs: dict[str, object], words: str) -> None:
    limits = {k: kwargs.pop(k) for k in ("max_model_len", "queue_timeout_s") if k in kwargs}
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Scheduler(SchedulerConfig(**kwargs), BlockManager(8, 4), limits=RequestLimits(**limits))  # type: ignore[arg-type]


def test_add_refuses_too_long_and_full_queue() -> None:
    sched, _bm, _ = make(num_blocks=8, block_size=4, max_model_len=40, max_waiting=2)
    with pytest.raises(RequestTooLongError, match=r"prompt \(30 tokens\) \+ max_tokens \(20\).*40") as e:
        sched.add(make_seq(1, 30, 20))
    assert (e.value.prompt_tokens, e.value.max_tokens, e.value.limit) == (30, 20, 40)
    # fits max_model_len, but 30 + 9 - 1 tokens need 10 blocks and the cache has 8 (32 tokens)
    with pytest.raises(RequestTooLongError, match=r"prompt \(30 tokens\) \+ max_tokens \(9\).*32 tokens"):
        sched.add(make_seq(1, 30, 9))
    sched.add(make_seq(1, 30, 3))  # 32 cached tokens at most: fits exactly
    with pytest.raises(ValueError, match="empty prompt"):
        sched.add(make_seq(2, [], 3))
    with pytest.raises(ValueError, match="already"):
        sched.add(make_seq(1, 4))
    sched.add(make_seq(2, 4))
    with pytest.raises(QueueFullError, match="2 requests waiting"):
        sched.add(make_seq(3, 4))
    assert sched.stats.num_rejected_queue_full == 1 and sched.stats.num_rejected_too_long == 2
    sched.schedule()  # admits 1 (it takes the whole cache): the queue has room again
    sched.add(make_seq(3, 4))
    assert sched.num_waiting == 2 and sched.num_running == 1


# ---- admission, lifecycle, prefix reuse -----------------------------------------------------


def test_lifecycle_prefill_decode_finish() -> None:
    clock = FakeClock()
    sched, bm, model = make(clock=clock)
    seq = make_seq(1, 10, max_tokens=3)
    sched.add(seq)
    assert sched.has_unfinished() and sched.num_waiting == 1
    out = step(sched, model)
    assert kinds(out) == [(1, 10, True)] and out.num_batched_tokens == 10
    assert seq.status is SequenceStatus.RUNNING and seq.first_scheduled_time == clock.t
    assert seq.first_token_time == clock.t and len(seq.output_token_ids) == 1
    out = step(sched, model)
    assert kinds(out) == [(1, 1, True)] and out.chunks[0].start_pos == 10
    step(sched, model)
    assert seq.is_finished and seq.finish_reason is FinishReason.LENGTH
    assert seq.output_token_ids == reference(seq.prompt_token_ids, 3)
    assert not sched.has_unfinished() and bm.num_free_blocks == bm.num_blocks
    out = sched.schedule()
    assert out.is_empty and out.wait_s is None


def test_prefix_reuse_sets_cached_tokens() -> None:
    sched, bm, model = make(block_size=4)
    shared = list(range(1, 9))  # two full blocks
    a = make_seq(1, [*shared, 50, 51], max_tokens=2)
    sched.add(a)
    run_all(sched, model)
    b = make_seq(2, [*shared, 60], max_tokens=2)
    sched.add(b)
    out = step(sched, model)
    assert b.num_cached_tokens == 8 and out.chunks[0].start_pos == 8 and len(out.chunks[0].token_ids) == 1
    run_all(sched, model)
    assert b.output_token_ids == reference(b.prompt_token_ids, 2)
    assert bm.num_free_blocks == bm.num_blocks


# ---- the delay window ------------------------------------------------------------------------


def test_lone_request_waits_at_most_the_delay() -> None:
    clock = FakeClock()
    sched, _, _ = make(clock=clock, max_queue_delay_ms=2)
    assert sched.schedule().wait_s is None  # idle
    sched.add(make_seq(1, 8))
    out = sched.schedule()
    assert out.is_empty and out.wait_s == pytest.approx(0.002)
    clock.t += 0.0015
    assert sched.schedule().wait_s == pytest.approx(0.0005)
    clock.t += 0.0005
    out = sched.schedule()
    assert kinds(out) == [(1, 8, True)] and out.wait_s is None


def test_second_arrival_in_window_batches() -> None:
    clock = FakeClock()
    sched, _, _ = make(clock=clock, max_queue_delay_ms=2)
    sched.add(make_seq(1, 8))
    clock.t += 0.001
    sched.add(make_seq(2, 8))
    out = sched.schedule()
    assert out.is_empty and out.wait_s == pytest.approx(0.001)  # the oldest request's window
    clock.t += 0.001
    out = sched.schedule()
    assert [c.seq_id for c in out.chunks] == [1, 2]


def test_full_budget_or_max_num_seqs_admits_at_once() -> None:
    sched, _, _ = make(max_queue_delay_ms=50, max_num_batched_tokens=16, max_num_seqs=4)
    sched.add(make_seq(1, 10))
    assert sched.schedule().is_empty
    sched.add(make_seq(2, 6))  # 16 prompt tokens: the budget is full
    assert [c.seq_id for c in sched.schedule().chunks] == [1, 2]
    sched2, _, _ = make(max_queue_delay_ms=50, max_num_batched_tokens=64, max_num_seqs=2)
    sched2.add(make_seq(1, 2))
    assert sched2.schedule().is_empty
    sched2.add(make_seq(2, 2))  # max_num_seqs requests: admit
    assert [c.seq_id for c in sched2.schedule().chunks] == [1, 2]


def test_zero_delay_admits_at_once() -> None:
    sched, _, _ = make(max_queue_delay_ms=0)
    sched.add(make_seq(1, 3))
    out = sched.schedule()
    assert kinds(out) == [(1, 3, True)] and out.wait_s is None


def test_no_delay_while_running() -> None:
    clock = FakeClock()
    sched, _, model = make(clock=clock, max_queue_delay_ms=5)
    sched.add(make_seq(1, 4, max_tokens=10))
    clock.t += 0.005
    step(sched, model)
    sched.add(make_seq(2, 4))  # arrives while 1 decodes: joins at the next boundary
    out = step(sched, model)
    assert kinds(out) == [(1, 1, True), (2, 4, True)]


# ---- budget split, chunked prefill, max_num_seqs ----------------------------------------------


def test_decodes_first_then_chunked_prefill() -> None:
    sched, bm, model = make(max_num_batched_tokens=16, max_num_seqs=4)
    sched.add(make_seq(1, 4, max_tokens=20))
    sched.add(make_seq(2, 4, max_tokens=20))
    step(sched, model)
    long = make_seq(3, 40, max_tokens=2)
    sched.add(long)
    plan = [kinds(step(sched, model)) for _ in range(3)]
    assert plan == [
        [(1, 1, True), (2, 1, True), (3, 14, False)],
        [(1, 1, True), (2, 1, True), (3, 14, False)],
        [(1, 1, True), (2, 1, True), (3, 12, True)],
    ]
    assert kinds(step(sched, model))[2] == (3, 1, True)  # now decoding too
    run_all(sched, model)
    assert long.output_token_ids == reference(long.prompt_token_ids, 2)
    assert bm.num_free_blocks == bm.num_blocks


def test_max_num_seqs() -> None:
    sched, _, model = make(max_num_seqs=2, max_num_batched_tokens=32)
    for i in range(1, 4):
        sched.add(make_seq(i, 4, max_tokens=2))
    out = step(sched, model)
    assert [c.seq_id for c in out.chunks] == [1, 2] and sched.num_waiting == 1
    step(sched, model)  # 1 and 2 finish
    assert [c.seq_id for c in step(sched, model).chunks] == [3]


def test_without_chunked_prefill_a_prompt_waits_for_room() -> None:
    sched, _, model = make(max_num_batched_tokens=16, max_model_len=16, max_num_seqs=4, chunked_prefill=False)
    for i in (1, 2, 3):
        sched.add(make_seq(i, 2, max_tokens=6))
    step(sched, model)
    sched.add(make_seq(4, 14, max_tokens=2))
    assert [c.seq_id for c in step(sched, model).chunks] == [1, 2, 3]  # 13 left < 14: waits
    outs = run_all(sched, model)
    assert all(len(c.token_ids) in (1, 14) for o in outs for c in o.chunks)


# ---- KV exhaustion ---------------------------------------------------------------------------


def test_recompute_preemption_resumes_with_same_output() -> None:
    # 3 sequences of up to 6 + 10 - 1 tokens (4 blocks each) in a 6-block cache
    sched, bm, model = make(num_blocks=6, block_size=4, max_num_seqs=3, max_num_batched_tokens=32)
    seqs = [make_seq(i, 6, max_tokens=10) for i in (1, 2, 3)]
    for s in seqs:
        sched.add(s)
    outs = run_all(sched, model)
    first = next(o for o in outs if o.preempted)
    assert first.preempted[0] is seqs[2]  # the newest goes first
    assert sched.stats.num_preemptions > 0 and seqs[2].num_preemptions > 0
    for s in seqs:
        assert s.output_token_ids == reference(s.prompt_token_ids, 10)
        assert s.finish_reason is FinishReason.LENGTH
    assert bm.num_free_blocks == bm.num_blocks


def test_preempted_sequence_is_requeued_and_recomputed() -> None:
    sched, bm, model = make(num_blocks=3, block_size=4, max_num_seqs=2, max_num_batched_tokens=8)
    a, b = make_seq(1, 4, max_tokens=5), make_seq(2, 3, max_tokens=5)
    sched.add(a)
    sched.add(b)
    step(sched, model)  # both prefilled: a holds 1 full block, b 1 block with 1 free slot
    out = step(sched, model)  # a needs a 2nd block (1 free); b writes its last slot
    assert kinds(out) == [(1, 1, True), (2, 1, True)]
    out = step(sched, model)  # a is fine, b needs a block: none free, b is the newest
    assert out.preempted == [b] and kinds(out) == [(1, 1, True)]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and sched.num_waiting == 1
    outputs_before = list(b.output_token_ids)
    while b.status is SequenceStatus.WAITING:
        out = step(sched, model)
    # re-prefill of prompt + outputs but the last, unsampled; the last output follows as a decode
    [re] = [c for c in out.chunks if c.seq_id == 2]
    assert re.start_pos % 4 == 0  # after the prefix-cache hit, if any
    assert not re.sample and re.start_pos + len(re.token_ids) == b.num_tokens - 1
    assert b.output_token_ids == outputs_before
    sampled_chunks: list[SeqChunk] = []
    while not sampled_chunks:  # b may be preempted again (a still grows): it resumes the same way
        sampled_chunks = [c for c in step(sched, model).chunks if c.seq_id == 2 and c.sample]
    assert list(sampled_chunks[0].token_ids) == [outputs_before[-1]]
    run_all(sched, model)
    assert b.output_token_ids == reference(b.prompt_token_ids, 5) and b.num_preemptions >= 1
    assert bm.num_free_blocks == bm.num_blocks


def test_no_evict_never_preempts_and_admits_later() -> None:
    sched, bm, model = make(
        num_blocks=8, block_size=4, max_num_seqs=3, max_num_batched_tokens=32, kv_policy="no_evict"
    )
    seqs = [make_seq(i, 6, max_tokens=10) for i in (1, 2, 3)]  # 4 blocks each at most
    for s in seqs:
        sched.add(s)
    out = step(sched, model)
    assert [c.seq_id for c in out.chunks] == [1, 2] and sched.num_waiting == 1
    outs = run_all(sched, model)
    assert sched.stats.num_preemptions == 0 and not any(o.preempted for o in outs)
    assert seqs[2].first_scheduled_time is not None
    for s in seqs:
        assert s.output_token_ids == reference(s.prompt_token_ids, 10)
    assert bm.num_free_blocks == bm.num_blocks


# ---- priorities --------------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "order"), [("fcfs", [1, 2, 3]), ("priority", [2, 3, 1])])
def test_admission_order(policy: str, order: list[int]) -> None:
    sched, _, model = make(max_num_seqs=1, policy=policy)
    for i, prio in ((1, 1), (2, 0), (3, 0)):
        sched.add(make_seq(i, 4, max_tokens=1, priority=prio))
    admitted = [c.seq_id for _ in range(3) for c in step(sched, model).chunks]
    assert admitted == order


@pytest.mark.parametrize(("policy", "victims"), [("fcfs", [3]), ("priority", [1, 3])])
def test_preemption_victims(policy: str, victims: list[int]) -> None:
    # 3 blocks of 4. a (priority 2, oldest) has room for 1 more token; b and c fill their block.
    sched, bm, model = make(num_blocks=3, block_size=4, max_num_seqs=3, policy=policy)
    sched.add(make_seq(1, 3, max_tokens=2, priority=2))
    sched.add(make_seq(2, 4, max_tokens=2))
    sched.add(make_seq(3, 4, max_tokens=2))
    step(sched, model)
    out = step(sched, model)
    # fcfs: a decodes in place, b needs a block and the newest (c) goes.
    # priority: b comes first, needs a block, and a (lowest priority) goes though oldest; then
    # c needs one too and is itself the last in order.
    assert [s.seq_id for s in out.preempted] == victims
    run_all(sched, model)
    assert bm.num_free_blocks == bm.num_blocks


# ---- aborts ------------------------------------------------------------------------------------


def test_abort_waiting() -> None:
    clock = FakeClock()
    sched, bm, _ = make(clock=clock, max_queue_delay_ms=10)
    seq = make_seq(1, 4)
    sched.add(seq)
    assert sched.abort(1) is seq and sched.abort(1) is None and sched.abort(99) is None
    assert seq.is_finished and seq.finish_reason is FinishReason.ABORT
    assert sched.has_unfinished()  # until the abort is reported
    out = sched.schedule()
    assert out.aborted == [seq] and out.is_empty and out.wait_s is None
    assert not sched.has_unfinished() and bm.num_free_blocks == bm.num_blocks


def test_queue_timeout_expires_only_never_admitted_sequences() -> None:
    """Triton's queue policy with REJECT: a sequence that waited past queue_timeout_s without
    being admitted leaves the queue (reported in `expired`, FINISHED, no blocks); a preempted
    one, requeued after its admission, is never expired; the others run to the end."""
    clock = FakeClock()
    sched, bm, model = make(num_blocks=3, block_size=4, clock=clock, max_num_seqs=2, max_num_batched_tokens=8,
                            queue_timeout_s=5.0)
    a, b = make_seq(1, 4, max_tokens=5), make_seq(2, 3, max_tokens=5)
    late = make_seq(3, 4, max_tokens=2)
    sched.add(a)
    sched.add(b)
    step(sched, model)
    clock.t += 1
    sched.add(late)  # waits: max_num_seqs is reached
    step(sched, model)
    out = step(sched, model)
    assert out.preempted == [b]
    clock.t += 5.5  # late has waited 5.5 s; b, requeued by the preemption, as long: only late is due
    out = step(sched, model)
    assert out.expired == [late] and late.is_finished and late.finish_reason is FinishReason.ABORT
    assert late.seq_id not in bm and sched.stats.num_expired == 1
    clock.t += 100
    while sched.has_unfinished():
        out = step(sched, model)
        assert not out.expired  # b, preempted and waiting again, never expires
    assert a.output_token_ids == reference(a.prompt_token_ids, 5)
    assert b.output_token_ids == reference(b.prompt_token_ids, 5)
    assert bm.num_free_blocks == bm.num_blocks


def test_queue_timeout_zero_never_expires() -> None:
    clock = FakeClock()
    sched, _, model = make(clock=clock, max_num_seqs=1)
    seqs = [make_seq(i, 4, max_tokens=2) for i in range(3)]
    for s in seqs:
        sched.add(s)
    clock.t += 1e6
    outs = run_all(sched, model)
    assert not any(o.expired for o in outs) and all(s.finish_reason is FinishReason.LENGTH for s in seqs)


@pytest.mark.parametrize("during_step", [False, True])
@pytest.mark.parametrize("state", ["prefilling", "decoding"])
def test_abort_running(state: str, during_step: bool) -> None:
    sched, bm, model = make(max_num_batched_tokens=8, max_num_seqs=2)
    other = make_seq(2, 3, max_tokens=6)
    sched.add(other)
    seq = make_seq(1, 20 if state == "prefilling" else 3, max_tokens=6)
    sched.add(seq)
    step(sched, model)
    assert seq.is_prefilling == (state == "prefilling")
    if during_step:
        out = sched.schedule()
        assert 1 in [c.seq_id for c in out.chunks]
        sampled = model.run(sched, out)
        assert sched.abort(1) is seq
        assert 1 in bm  # the step in flight may still write its blocks
        sched.on_step_done(out, sampled)
    else:
        assert sched.abort(1) is seq
    n_out = len(seq.output_token_ids)
    out = step(sched, model)
    assert out.aborted == [seq] and 1 not in bm and all(c.seq_id == 2 for c in out.chunks)
    assert len(seq.output_token_ids) == n_out and seq.finish_reason is FinishReason.ABORT
    run_all(sched, model)
    assert other.output_token_ids == reference(other.prompt_token_ids, 6)
    assert bm.num_free_blocks == bm.num_blocks


def test_finish_during_step_frees_at_boundary() -> None:
    sched, bm, model = make()
    seq = make_seq(1, 4, max_tokens=5)
    sched.add(seq)
    step(sched, model)
    out = sched.schedule()
    sampled = model.run(sched, out)
    sched.finish(seq, FinishReason.STOP)  # e.g. a stop string found by another thread's detokenizer
    assert 1 in bm
    sched.on_step_done(out, sampled)
    assert 1 not in bm and len(seq.output_token_ids) == 1
    sched.finish(seq, FinishReason.LENGTH)  # already finished: a no-op
    assert seq.finish_reason is FinishReason.STOP


def test_on_step_done_contract() -> None:
    sched, _, model = make()
    seq = make_seq(1, 4, max_tokens=5)
    sched.add(seq)
    out = sched.schedule()
    with pytest.raises(ValueError, match=r"no sampled token for sequences \[1\]"):
        sched.on_step_done(out, {})
    assert seq.output_token_ids == []
    sched.on_step_done(out, model.run(sched, out))
    with pytest.raises(ValueError, match="not the one in flight"):
        sched.on_step_done(out, {1: 0})
    with pytest.raises(RuntimeError, match="call on_step_done"):  # a step whose tokens were lost
        sched.schedule()
        sched.schedule()


# ---- live config ----------------------------------------------------------------------------


def test_update_config_applies_at_next_schedule() -> None:
    sched, _, model = make(max_num_batched_tokens=16, max_num_seqs=2)
    sched.add(make_seq(1, 40, max_tokens=2))
    assert kinds(step(sched, model)) == [(1, 16, False)]
    new = SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=2, max_queue_delay_ms=0)
    sched.update_config(new)
    assert sched.config.max_num_batched_tokens == 16  # not yet
    assert kinds(step(sched, model)) == [(1, 8, False)]
    assert sched.config is new


def test_policy_switch_reorders_queue() -> None:
    sched, _, model = make(max_num_seqs=1)
    for i, prio in ((1, 0), (2, 5), (3, 1)):
        sched.add(make_seq(i, 2, max_tokens=1, priority=prio))
    sched.update_config(SchedulerConfig(max_num_seqs=1, max_queue_delay_ms=0, policy="priority"))
    admitted = [c.seq_id for _ in range(3) for c in step(sched, model).chunks]
    assert admitted == [1, 3, 2]


# ---- randomized ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(16))
def test_randomized_to_completion(seed: int) -> None:
    rng = random.Random(seed)
    clock = FakeClock()
    budget, max_num_seqs = rng.choice([8, 16, 48]), rng.choice([2, 4, 8])
    cfg: dict[str, object] = {
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": budget,
        "max_queue_delay_ms": rng.choice([0, 1, 3]),
        "max_waiting": rng.choice([4, 512]),
        "policy": rng.choice(["fcfs", "priority"]),
        "kv_policy": rng.choice(["recompute", "recompute", "no_evict"]),
        # without chunked prefill the budget must hold max_model_len
        "chunked_prefill": budget < 48 or rng.random() < 0.5,
        "max_model_len": 48,
    }
    sched, bm, model = make(num_blocks=rng.choice([12, 16, 24]), block_size=4, clock=clock, **cfg)
    stop = 17
    shared = [rng.randrange(VOCAB) for _ in range(12)]
    seqs: dict[int, Sequence] = {}
    aborted: set[int] = set()
    pending = 40
    next_id = 1
    for _ in range(5000):
        if pending and rng.random() < 0.4:
            n = rng.randint(1, 24)
            prompt = shared[: rng.randint(0, 12)] + [rng.randrange(VOCAB) for _ in range(n)]
            prompt = prompt[:30]
            seq = make_seq(next_id, prompt, max_tokens=rng.randint(1, 12), priority=rng.randint(0, 2))
            try:
                sched.add(seq)
                seqs[next_id] = seq
            except QueueFullError:
                pass
            next_id += 1
            pending -= 1
        live = [s for s in seqs.values() if not s.is_finished]
        if live and rng.random() < 0.05:
            victim = rng.choice(live)
            assert sched.abort(victim.seq_id) is victim
            aborted.add(victim.seq_id)
        out = sched.schedule()
        assert out.num_batched_tokens <= budget and sched.num_running <= max_num_seqs
        assert out.num_batched_tokens == sum(len(c.token_ids) for c in out.chunks)
        if cfg["kv_policy"] == "no_evict":
            assert not out.preempted
        # decodes (sampled chunks of sequences with outputs) come before every prefill chunk
        is_decode = [c.sample and bool(seqs[c.seq_id].output_token_ids) for c in out.chunks]
        assert is_decode == sorted(is_decode, reverse=True)
        sampled = model.run(sched, out)
        if out.chunks and rng.random() < 0.05:  # an abort while the step runs
            c = rng.choice(out.chunks)
            sched.abort(c.seq_id)
            aborted.add(c.seq_id)
        sched.on_step_done(out, sampled)
        for sid in sampled:
            s = seqs[sid]
            if s.is_finished:
                continue
            if s.output_token_ids[-1] % stop == 0:
                sched.finish(s, FinishReason.STOP)
            elif len(s.output_token_ids) >= s.max_tokens:
                sched.finish(s, FinishReason.LENGTH)
        bm.integrity_check()
        if out.is_empty and out.wait_s is not None:
            clock.t += out.wait_s
        else:
            clock.t += 0.0003
        if not pending and not sched.has_unfinished():
            break
    else:
        pytest.fail("did not finish")
    assert bm.num_free_blocks == bm.num_blocks
    for sid, s in seqs.items():
        assert s.is_finished
        ref = reference(s.prompt_token_ids, s.max_tokens, stop)
        if sid in aborted:
            assert s.finish_reason is FinishReason.ABORT and s.output_token_ids == ref[: len(s.output_token_ids)]
        else:
            assert s.output_token_ids == ref
            assert s.finish_reason is (FinishReason.LENGTH if len(ref) == s.max_tokens and ref[-1] % stop
                                       else FinishReason.STOP)
