"""Tests of the KV cache block manager: unit tests of each contract, then a hypothesis state
machine that drives random allocate / reserve / append / fork / free / re-admit sequences
against a model of the cache contents (each slot holds the prefix its K/V were computed from),
so a wrong prefix hit, a missed copy-on-write or a clobbered block shows up as wrong contents."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from inflightd.engine import block_manager as kv_cache
from inflightd.engine.block_manager import (
    BlockManager,
    KVCacheIntegrityError,
    OutOfBlocksError,
    UnknownSequenceError,
)

_REAL_BLOCK_HASH = kv_cache.block_hash


@pytest.fixture(autouse=True)
def _restore_block_hash() -> Iterator[None]:
    # The state machine swaps in a weak hash for some runs; never let it leak into other tests.
    yield
    kv_cache.block_hash = _REAL_BLOCK_HASH


def admit(bm: BlockManager, seq_id: int, prompt: Sequence[int]) -> int:
    """Allocate and prefill the whole prompt in one chunk; return cached_tokens."""
    cached = bm.allocate(seq_id, prompt)
    bm.reserve_prompt_slots(seq_id, len(prompt) - cached)
    bm.integrity_check()
    return cached


# ---- allocate / reserve / append / free ---------------------------------------------------


def test_allocate_reserve_append_free() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.can_allocate(6) and bm.can_allocate([1, 2, 3, 4, 5, 6])
    assert bm.allocate(1, [1, 2, 3, 4, 5, 6]) == 0
    table = bm.block_table(1)
    assert len(table) == 2 and bm.num_free_blocks == 6
    assert bm.num_reserved_tokens(1) == 0
    slots = bm.reserve_prompt_slots(1, 6)
    assert slots == [table[0] * 4 + o for o in range(4)] + [table[1] * 4, table[1] * 4 + 1]
    assert bm.slot_mapping(1, 0, 6) == slots
    assert bm.append_slots(1, [7]) == [table[1] * 4 + 2]
    assert bm.append_slots(1, [8]) == [table[1] * 4 + 3]  # fills block 1, no new block yet
    assert bm.block_table(1) == table
    [slot] = bm.append_slots(1, [9])  # one past the boundary: a new block
    assert len(bm.block_table(1)) == 3 and slot == bm.block_table(1)[2] * 4
    bm.integrity_check()
    bm.free(1)
    assert bm.num_free_blocks == 8 and 1 not in bm
    bm.integrity_check()


def test_chunked_prefill_slots_match_single_chunk() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(1, list(range(10)))
    chunks = [bm.reserve_prompt_slots(1, n) for n in (3, 5, 2)]
    assert sum(chunks, []) == bm.slot_mapping(1, 0, 10)
    assert bm.reserve_prompt_slots(1, 0) == []
    with pytest.raises(ValueError, match="prompt"):
        bm.reserve_prompt_slots(1, 1)


def test_prompt_ending_exactly_at_block_end() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    admit(bm, 1, list(range(8)))
    assert len(bm.block_table(1)) == 2 and bm.num_free_blocks == 1
    assert bm.can_append(1, 1) and bm.can_append(1, 4) and not bm.can_append(1, 5)
    bm.append_slots(1, [8])
    assert len(bm.block_table(1)) == 3


def test_prompt_one_past_block_end() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    admit(bm, 1, list(range(9)))
    assert len(bm.block_table(1)) == 3 and bm.num_free_blocks == 0
    assert bm.can_append(1, 3) and not bm.can_append(1, 4)
    bm.append_slots(1, [9, 10, 11])
    with pytest.raises(OutOfBlocksError):
        bm.append_slots(1, [12])
    assert bm.num_reserved_tokens(1) == 12  # the failed append changed nothing
    bm.integrity_check()


def test_usage() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    assert bm.usage == 0.0
    bm.allocate(1, [1, 2, 3])
    assert bm.usage == 0.5
    bm.fork(1, 2)  # sharing costs nothing
    assert bm.usage == 0.5
    bm.free(1)
    bm.free(2)
    assert bm.usage == 0.0


# ---- prefix caching ---------------------------------------------------------------------


def test_prefix_hit_on_identical_prompt() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(10))
    assert admit(bm, 1, prompt) == 0
    assert admit(bm, 2, prompt) == 8
    assert bm.num_cached_tokens(2) == 8
    assert bm.block_table(2)[:2] == bm.block_table(1)[:2]
    assert bm.block_table(2)[2] != bm.block_table(1)[2]  # the partial block is never shared
    assert bm.slot_mapping(2, 0, 8) == bm.slot_mapping(1, 0, 8)
    assert (bm.num_prefix_query_tokens, bm.num_prefix_hit_tokens) == (20, 8)
    assert bm.prefix_hit_rate == pytest.approx(0.4)


def test_invalidate_drops_blocks_from_the_prefix_cache() -> None:
    """What a failed step does to the blocks it was writing: no later prompt hits them, the free
    ones become ordinary free blocks, and a block held by a sequence stays in its table."""
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(10))
    admit(bm, 1, prompt)
    table = bm.block_table(1)
    bm.invalidate(table[:1])  # held: leaves the cache, stays with sequence 1
    bm.integrity_check()
    assert bm.block_table(1) == table
    bm.free(1)
    bm.invalidate(table[1:])  # free and cached: becomes uncached
    bm.integrity_check()
    assert admit(bm, 2, prompt) == 0
    bm.invalidate([0, 1, 2, 3])  # blocks without a hash, or unknown to the cache: no-op
    bm.integrity_check()


def test_partial_prefix_hit() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    admit(bm, 1, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert admit(bm, 2, [1, 2, 3, 4, 5, 6, 0, 0, 9]) == 4
    assert bm.block_table(2)[0] == bm.block_table(1)[0]
    assert admit(bm, 3, [0, 2, 3, 4, 5, 6, 7, 8, 9]) == 0  # a later match needs the earlier one


def test_cached_tokens_never_cover_the_whole_prompt() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    admit(bm, 1, list(range(12)))
    assert admit(bm, 2, list(range(12))) == 8  # fully cached: the last block is recomputed
    assert admit(bm, 3, list(range(4))) == 0
    assert admit(bm, 4, list(range(9))) == 8
    assert admit(bm, 5, [0]) == 0
    # The recomputed last block is a fresh one, not the shared cached block.
    assert bm.block_table(2)[2] != bm.block_table(1)[2]


def test_blocks_join_the_cache_only_once_reserved() -> None:
    # A chunked prefill has not computed its later blocks: nobody may hit them yet.
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(10))
    bm.allocate(1, prompt)
    assert bm.allocate(2, prompt) == 0
    bm.reserve_prompt_slots(1, 5)
    assert bm.allocate(3, prompt) == 4


def test_hash_collision_does_not_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_cache, "block_hash", lambda parent, tokens: 42)
    bm = BlockManager(num_blocks=8, block_size=2)
    admit(bm, 1, [1, 2, 3, 4, 5])
    assert admit(bm, 2, [7, 8, 9]) == 0
    assert admit(bm, 3, [1, 2, 3]) == 2  # the one block holding the entry still hits
    bm.integrity_check()


def test_collision_in_an_earlier_block_does_not_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    # A hash that ignores the parent: block [3, 4] after [1, 2] and after [9, 9] collide.
    monkeypatch.setattr(kv_cache, "block_hash", lambda parent, tokens: hash(tokens))
    bm = BlockManager(num_blocks=8, block_size=2)
    admit(bm, 1, [1, 2, 3, 4, 0])
    admit(bm, 2, [9, 9, 0])
    assert admit(bm, 3, [9, 9, 3, 4, 0]) == 2  # [9, 9] hits; [3, 4] must not
    bm.integrity_check()


def test_lru_evicts_least_recently_freed_first() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    for seq_id, prompt in enumerate([[1, 2], [3, 4], [5, 6]]):
        admit(bm, seq_id, prompt)  # one full block each, cached once reserved
    a, b, c = (bm.block_table(i)[0] for i in range(3))
    for seq_id in (0, 2, 1):
        bm.free(seq_id)
    assert bm.num_free_blocks == 3
    admit(bm, 10, [7, 8])
    assert bm.block_table(10) == [a]
    admit(bm, 11, [9, 10])
    assert bm.block_table(11) == [c]
    bm.free(10)
    bm.free(11)
    assert admit(bm, 12, [3, 4, 0]) == 2  # b survived
    assert bm.block_table(12)[0] == b


def test_uncached_free_blocks_go_before_cached_ones() -> None:
    bm = BlockManager(num_blocks=5, block_size=2)
    admit(bm, 1, [1, 2, 3])  # block 0 full (cached), block 1 partial (uncached)
    cached_block = bm.block_table(1)[0]
    bm.free(1)
    admit(bm, 2, [7, 8, 9, 10, 11, 12])  # three fresh blocks: two never used, one uncached
    assert cached_block not in bm.block_table(2)
    assert admit(bm, 3, [1, 2, 0]) == 2


def test_revive_from_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    admit(bm, 1, [1, 2, 3, 4, 5])
    table = bm.block_table(1)
    bm.free(1)
    assert bm.num_free_blocks == 4
    assert bm.can_allocate([1, 2, 3, 4, 5, 6, 7, 8])
    assert admit(bm, 2, [1, 2, 3, 4, 5, 6, 7, 8]) == 4
    assert bm.block_table(2)[:2] == table[:2]
    assert bm.num_free_blocks == 0
    bm.free(2)
    assert bm.num_free_blocks == 4


def test_can_allocate_counts_hits_on_blocks_in_use() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    admit(bm, 1, [1, 2, 3, 4, 5])
    assert bm.num_free_blocks == 1
    assert not bm.can_allocate(5)
    assert not bm.can_allocate([9, 2, 3, 4, 5])
    assert bm.can_allocate([1, 2, 3, 4, 6])
    assert bm.allocate(2, [1, 2, 3, 4, 6]) == 4
    assert bm.num_free_blocks == 0


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    admit(bm, 1, [1, 2, 3, 4, 5])
    assert admit(bm, 2, [1, 2, 3, 4, 5]) == 0
    assert bm.num_prefix_query_tokens == 0 and bm.prefix_hit_rate == 0.0
    bm.free(1)
    bm.free(2)
    assert bm.num_free_blocks == 8


def test_free_keeps_full_blocks_for_recompute() -> None:
    # Preemption by recompute: the sequence comes back with prompt + generated tokens.
    bm = BlockManager(num_blocks=8, block_size=4)
    admit(bm, 1, [1, 2, 3, 4, 5, 6])
    bm.append_slots(1, [7])
    bm.append_slots(1, [8])
    bm.append_slots(1, [9])
    bm.free(1)
    assert admit(bm, 1, [1, 2, 3, 4, 5, 6, 7, 8, 9]) == 8


# ---- fork and copy-on-write ---------------------------------------------------------------


def test_fork_then_copy_on_write() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    admit(bm, 1, [1, 2, 3, 4, 5, 6])
    parent = bm.block_table(1)
    bm.fork(1, 2)
    assert bm.block_table(2) == parent and bm.num_free_blocks == 6
    bm.integrity_check()
    assert bm.can_append(2, 1)
    [slot] = bm.append_slots(2, [70])
    child = bm.block_table(2)
    assert child[0] == parent[0]  # the full block stays shared
    assert child[1] not in parent and slot == child[1] * 4 + 2
    assert bm.take_pending_copies() == [(parent[1], child[1])]
    assert bm.take_pending_copies() == []
    bm.append_slots(1, [71])  # the parent now owns its last block alone: no copy
    assert bm.block_table(1) == parent and bm.take_pending_copies() == []
    bm.integrity_check()


def test_fork_at_block_boundary_needs_no_copy() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    admit(bm, 1, list(range(8)))
    bm.fork(1, 2)
    bm.append_slots(2, [8])
    bm.append_slots(1, [9])
    assert bm.take_pending_copies() == []
    assert bm.block_table(1)[:2] == bm.block_table(2)[:2]
    assert bm.block_table(1)[2] != bm.block_table(2)[2]


def test_fork_during_chunked_prefill() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(1, list(range(7)))
    bm.reserve_prompt_slots(1, 2)
    bm.fork(1, 2)
    parent = bm.block_table(1)
    bm.reserve_prompt_slots(2, 5)
    child = bm.block_table(2)
    # Block 0 holds two written slots: copied. Block 1 holds none yet: just replaced.
    assert set(child).isdisjoint(parent)
    assert bm.take_pending_copies() == [(parent[0], child[0])]
    bm.reserve_prompt_slots(1, 5)
    assert bm.block_table(1) == parent and bm.take_pending_copies() == []
    bm.integrity_check()


def test_can_append_counts_copy_on_write() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    admit(bm, 1, [1, 2, 3, 4, 5])
    bm.fork(1, 2)
    assert bm.num_free_blocks == 0
    assert not bm.can_append(2)
    with pytest.raises(OutOfBlocksError):
        bm.append_slots(2, [6])
    assert bm.block_table(2) == bm.block_table(1)
    bm.integrity_check()


def test_free_drops_copies_into_freed_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    admit(bm, 1, [1, 2, 3, 4, 5])
    bm.fork(1, 2)
    bm.append_slots(2, [6])
    bm.free(2)  # e.g. aborted before the step ran
    assert bm.take_pending_copies() == []


# ---- errors -----------------------------------------------------------------------------


def test_errors() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(UnknownSequenceError, match="7") as info:
        bm.block_table(7)
    assert isinstance(info.value, KeyError) and info.value.seq_id == 7
    for call in (lambda: bm.free(7), lambda: bm.append_slots(7, [1]), lambda: bm.fork(7, 8)):
        with pytest.raises(UnknownSequenceError):
            call()
    with pytest.raises(OutOfBlocksError, match="3 free blocks"):
        bm.allocate(1, list(range(9)))
    assert 1 not in bm and bm.num_free_blocks == 2
    with pytest.raises(ValueError, match="empty"):
        bm.allocate(1, [])
    bm.allocate(1, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="already"):
        bm.allocate(1, [1])
    with pytest.raises(ValueError, match="already"):
        bm.fork(1, 1)
    with pytest.raises(ValueError, match="reserve_prompt_slots"):
        bm.append_slots(1, [6])
    with pytest.raises(ValueError, match="reserved"):
        bm.slot_mapping(1, 0, 1)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)


def test_integrity_check_catches_corruption() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    admit(bm, 1, [1, 2, 3])
    bm._blocks[bm.block_table(1)[0]].ref_count += 1
    with pytest.raises(KVCacheIntegrityError, match="ref count"):
        bm.integrity_check()


# ---- state machine ------------------------------------------------------------------------

# Prompts share prefixes, and a tiny vocabulary makes equal blocks likely, so hits happen often.
_POOL = [
    [1, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2, 0],
    [1, 2, 1, 0, 2, 1, 1, 1, 0, 2],
    [2, 2, 2, 2, 2, 2, 2, 2, 2],
    [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0],
]


def _weak_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return sum(tokens) % 3  # ignores the parent and collides constantly


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(1, 1)
        self.tokens: dict[int, list[int]] = {}  # what each live sequence holds
        self.cache: dict[int, tuple[int, ...]] = {}  # slot -> prefix its K/V came from
        self.next_id = 0

    @initialize(
        num_blocks=st.integers(2, 16),
        block_size=st.sampled_from([1, 2, 3, 4]),
        prefix_caching=st.booleans(),
        weak_hash=st.booleans(),
    )
    def setup(self, num_blocks: int, block_size: int, prefix_caching: bool, weak_hash: bool) -> None:
        kv_cache.block_hash = _weak_hash if weak_hash else _REAL_BLOCK_HASH
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)

    # -- helpers

    def _write(self, seq_id: int, start: int, slots: list[int]) -> None:
        """Play the runner: pending copies first, then this step's K/V writes."""
        bs = self.bm.block_size
        for src, dst in self.bm.take_pending_copies():
            for o in range(bs):
                if src * bs + o in self.cache:
                    self.cache[dst * bs + o] = self.cache[src * bs + o]
        tokens = self.tokens[seq_id]
        for pos, slot in enumerate(slots, start):
            self.cache[slot] = tuple(tokens[: pos + 1])

    def _admit(self, prompt: list[int], prefill: bool = False) -> None:
        seq_id = self.next_id
        self.next_id += 1
        fits = self.bm.can_allocate(prompt)
        if self.bm.can_allocate(len(prompt)):
            assert fits  # hits can only lower the need
        if not fits:
            with pytest.raises(OutOfBlocksError):
                self.bm.allocate(seq_id, prompt)
            assert seq_id not in self.bm
            return
        cached = self.bm.allocate(seq_id, prompt)
        assert 0 <= cached < len(prompt) and cached % self.bm.block_size == 0
        self.tokens[seq_id] = list(prompt)
        if prefill and self.bm.can_append(seq_id, len(prompt) - cached):
            self._write(seq_id, cached, self.bm.reserve_prompt_slots(seq_id, len(prompt) - cached))

    def _pick(self, data: st.DataObject, ids: list[int]) -> int:
        return data.draw(st.sampled_from(sorted(ids)))

    def _prefilling(self) -> list[int]:
        return [s for s, t in self.tokens.items() if self.bm.num_reserved_tokens(s) < len(t)]

    def _decoding(self) -> list[int]:
        return [s for s, t in self.tokens.items() if self.bm.num_reserved_tokens(s) == len(t)]

    # -- rules

    @precondition(lambda self: len(self.tokens) < 8)
    @rule(
        base=st.sampled_from(_POOL),
        data=st.data(),
        tail=st.lists(st.integers(0, 2), max_size=3),
    )
    def allocate(self, base: list[int], data: st.DataObject, tail: list[int]) -> None:
        cut = data.draw(st.integers(1, len(base)))
        self._admit(base[:cut] + tail, prefill=data.draw(st.booleans()))

    @precondition(lambda self: bool(self._prefilling()))
    @rule(data=st.data())
    def reserve_prompt_chunk(self, data: st.DataObject) -> None:
        seq_id = self._pick(data, self._prefilling())
        start = self.bm.num_reserved_tokens(seq_id)
        n = data.draw(st.integers(0, len(self.tokens[seq_id]) - start))
        if not self.bm.can_append(seq_id, n):
            with pytest.raises(OutOfBlocksError):
                self.bm.reserve_prompt_slots(seq_id, n)
            return
        self._write(seq_id, start, self.bm.reserve_prompt_slots(seq_id, n))

    @precondition(lambda self: bool(self._decoding()))
    @rule(data=st.data(), new=st.lists(st.integers(0, 2), min_size=1, max_size=3))
    def append(self, data: st.DataObject, new: list[int]) -> None:
        seq_id = self._pick(data, self._decoding())
        start = len(self.tokens[seq_id])
        if not self.bm.can_append(seq_id, len(new)):
            with pytest.raises(OutOfBlocksError):
                self.bm.append_slots(seq_id, new)
            return
        self.tokens[seq_id].extend(new)
        self._write(seq_id, start, self.bm.append_slots(seq_id, new))

    @precondition(lambda self: 0 < len(self.tokens) < 8)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = self._pick(data, list(self.tokens))
        child = self.next_id
        self.next_id += 1
        self.bm.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq_id = self._pick(data, list(self.tokens))
        self.bm.free(seq_id)
        del self.tokens[seq_id]

    @precondition(lambda self: bool(self._decoding()))
    @rule(data=st.data())
    def preempt_and_readmit(self, data: st.DataObject) -> None:
        seq_id = self._pick(data, self._decoding())
        tokens = self.tokens.pop(seq_id)
        self.bm.free(seq_id)
        self._admit(tokens, prefill=True)

    # -- invariants

    @invariant()
    def bookkeeping_is_consistent(self) -> None:
        self.bm.integrity_check()
        used = {b for s in self.tokens for b in self.bm.block_table(s)}
        assert self.bm.num_free_blocks == self.bm.num_blocks - len(used)

    @invariant()
    def reserved_slots_hold_their_prefix(self) -> None:
        for seq_id, tokens in self.tokens.items():
            n = self.bm.num_reserved_tokens(seq_id)
            for pos, slot in enumerate(self.bm.slot_mapping(seq_id, 0, n)):
                assert self.cache.get(slot) == tuple(tokens[: pos + 1]), (seq_id, pos, slot)

    def teardown(self) -> None:
        try:
            for seq_id in list(self.tokens):
                self.bm.free(seq_id)
            self.bm.integrity_check()
            assert self.bm.num_free_blocks == self.bm.num_blocks
            assert self.bm.take_pending_copies() == []
        finally:
            kv_cache.block_hash = _REAL_BLOCK_HASH


BlockManagerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
