"""Block allocation for the paged KV cache: block tables, ref counts, prefix caching, copy-on-write.

The K/V tensors live in the model runner; this module only decides which physical block ids each
sequence uses, so it is pure Python and unit-tested without torch. The shape follows nano-vllm's
`BlockManager`.

Lifecycle of a sequence (identified by an int `seq_id` chosen by the caller):

1. `allocate(seq_id, prompt)` at admission: blocks for the whole prompt, the leading full blocks
   taken from the prefix cache where possible. Returns `cached_tokens`, the prompt tokens whose
   K/V are already in the cache; they need no compute.
2. Prefill, in one chunk or several: `reserve_prompt_slots(seq_id, n)` hands out the slots of the
   next `n` prompt tokens (slot = block_id * block_size + offset, what `write_kv_cache` takes).
3. Decode: `append_slots(seq_id, [token])` records the token fed to the model this step and
   hands out the slot its K/V goes to, adding a block when the last one is full.
4. `free(seq_id)` on finish, abort or preemption.

"Reserved" means the slot is handed out for this step's writes. A block whose last slot is
reserved is full: its K/V are written by the end of the step, so it is registered in the prefix
cache then (a sequence admitted in the same step may hit it, as the step writes every layer's
K/V before that layer's attention reads them). Registering at admission instead, as nano-vllm
does, would let a second request hit blocks a chunked prefill has not computed yet.

Before every step's cache writes the runner performs `take_pending_copies()`, in list order:
copy-on-write hands a sequence a fresh block when it would write into a block shared with
another sequence (after `fork`), and the fresh block needs the shared block's K/V.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .block_keys import BlockKey, block_hash, same_prefix


class KVCacheError(Exception):
    """Base class of the errors raised by `BlockManager`."""


class OutOfBlocksError(KVCacheError):
    """Not enough free blocks. Callers check `can_allocate` / `can_append` first."""


class UnknownSequenceError(KVCacheError, KeyError):
    """The seq_id has no blocks: never allocated, or already freed."""

    def __init__(self, seq_id: int) -> None:
        super().__init__(seq_id)
        self.seq_id = seq_id

    def __str__(self) -> str:  # KeyError's own __str__ would print just the repr of the id
        return f"unknown sequence {self.seq_id}"


class KVCacheIntegrityError(KVCacheError):
    """`integrity_check` found the manager's bookkeeping inconsistent (a bug, not bad input)."""


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None  # set while registered in the prefix cache


@dataclass
class _SeqState:
    token_ids: list[int]  # prompt, then every appended token
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens found in the prefix cache at allocation
    num_reserved_tokens: int  # leading tokens whose slots have been handed out
    block_table: list[int] = field(default_factory=list)
    # Key of each full reserved block, even one not registered (its hash was taken): the parent
    # of the next block's key.
    block_keys: list[BlockKey] = field(default_factory=list)


class BlockManager:
    """Hands out KV cache blocks to sequences. Not thread-safe: the step loop owns it.

    Free blocks come in two kinds, both counted by `num_free_blocks`: uncached ones (never used,
    or freed without a hash) and cached ones (ref count 0, still registered in the prefix cache,
    kept in LRU order). A fresh block comes from the uncached ones first; only when none is left
    is the least recently freed cached block evicted (its hash dropped). A prefix hit on a cached
    free block revives it.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks and block_size must be ≥ 1 (got {num_blocks}, {block_size})"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free_uncached: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._hash_to_block: dict[int, int] = {}
        self._seqs: dict[int, _SeqState] = {}
        self._pending_copies: list[tuple[int, int]] = []
        # Prefix cache counters, in tokens, for /metrics (queried = prompt tokens allocated).
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0

    # ---- capacity -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a request could get now, evicting cached free blocks if need be."""
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some sequence, in [0, 1]."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        """Hit tokens / queried tokens since start (0.0 before any query)."""
        if self.num_prefix_query_tokens == 0:
            return 0.0
        return self.num_prefix_hit_tokens / self.num_prefix_query_tokens

    def can_allocate(self, num_tokens_or_token_ids: int | Sequence[int]) -> bool:
        """Whether `allocate` of such a prompt would succeed now.

        Given token ids, prefix hits on blocks in use count as free; given a count, none do.
        """
        if isinstance(num_tokens_or_token_ids, int):
            return self._num_blocks_for(num_tokens_or_token_ids) <= self.num_free_blocks
        return self._blocks_needed_for_prompt(num_tokens_or_token_ids) <= self.num_free_blocks

    def can_append(self, seq_id: int, n: int = 1) -> bool:
        """Whether the next `n` slots of the sequence can be reserved now, by
        `reserve_prompt_slots(seq_id, n)` or `append_slots` of `n` tokens (counting the fresh
        blocks copy-on-write needs)."""
        return self._blocks_needed_to_reserve(self._seq(seq_id), n) <= self.num_free_blocks

    # ---- sequence lifecycle ---------------------------------------------------------------

    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Give a new sequence blocks for its whole prompt; return its `cached_tokens`.

        `cached_tokens` is a multiple of `block_size` and less than `len(token_ids)`: the last
        prompt token is always computed, so that the model yields logits, and a fully cached
        prompt recomputes its last block (into a fresh block, as the cached one is shared).
        Raises `OutOfBlocksError` (nothing changed) when `can_allocate(token_ids)` is false,
        `ValueError` for an empty prompt or a seq_id in use.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already has blocks")
        if len(token_ids) == 0:
            raise ValueError(f"sequence {seq_id}: empty prompt")
        hits = self._match_prefix(token_ids)
        needed = self._blocks_needed_for_prompt(token_ids, hits)
        if needed > self.num_free_blocks:
            raise OutOfBlocksError(
                f"sequence {seq_id}: prompt of {len(token_ids)} tokens needs {needed} free blocks, "
                f"{self.num_free_blocks} free"
            )
        # Claim the hits before taking fresh blocks, so that eviction cannot pick them.
        for _key, block_id in hits:
            self._take_ref(block_id)
        cached = len(hits) * self.block_size
        state = _SeqState(list(token_ids), len(token_ids), cached, cached)
        state.block_table = [block_id for _key, block_id in hits]
        state.block_keys = [key for key, _block_id in hits]
        for _ in range(self._num_blocks_for(len(token_ids)) - len(hits)):
            state.block_table.append(self._take_fresh_block())
        self._seqs[seq_id] = state
        if self.enable_prefix_caching:
            self.num_prefix_query_tokens += len(token_ids)
            self.num_prefix_hit_tokens += cached
        return cached

    def reserve_prompt_slots(self, seq_id: int, num_tokens: int) -> list[int]:
        """Reserve the slots of the next `num_tokens` prompt tokens (a prefill chunk) and return
        them in order. The chunk's positions are `[num_reserved_tokens(seq_id), +num_tokens)`.

        Raises `ValueError` past the end of the prompt, `OutOfBlocksError` (nothing changed)
        when copy-on-write needs blocks that are not there (only possible after `fork`).
        """
        state = self._seq(seq_id)
        if num_tokens < 0 or state.num_reserved_tokens + num_tokens > state.num_prompt_tokens:
            raise ValueError(
                f"sequence {seq_id}: cannot reserve {num_tokens} prompt tokens from position "
                f"{state.num_reserved_tokens} of a {state.num_prompt_tokens}-token prompt"
            )
        return self._reserve(seq_id, state, num_tokens)

    def append_slots(self, seq_id: int, new_token_ids: Sequence[int]) -> list[int]:
        """Record tokens about to be computed (usually the one sampled last step) and return
        the slots their K/V go to, adding blocks as boundaries are crossed.

        The prompt must be fully reserved first (`ValueError` otherwise). Raises
        `OutOfBlocksError` (nothing changed) when `can_append(seq_id, len(new_token_ids))` is
        false. Blocks filled here join the prefix cache.
        """
        state = self._seq(seq_id)
        if state.num_reserved_tokens != len(state.token_ids):
            raise ValueError(
                f"sequence {seq_id}: {len(state.token_ids) - state.num_reserved_tokens} prompt "
                "tokens not reserved yet; reserve_prompt_slots first"
            )
        n = len(new_token_ids)
        self._check_room(seq_id, state, n)  # before any change, so a failure changes nothing
        state.token_ids.extend(new_token_ids)
        return self._reserve(seq_id, state, n)

    def fork(self, parent_id: int, child_id: int) -> None:
        """Make `child_id` a copy of `parent_id` sharing all its blocks (n > 1 sampling).

        Either one writing into a shared block later gets its own copy (see the module doc).
        """
        parent = self._seq(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id} already has blocks")
        for block_id in parent.block_table:
            self._blocks[block_id].ref_count += 1
        self._seqs[child_id] = _SeqState(
            list(parent.token_ids),
            parent.num_prompt_tokens,
            parent.num_cached_tokens,
            parent.num_reserved_tokens,
            list(parent.block_table),
            list(parent.block_keys),
        )

    def free(self, seq_id: int) -> None:
        """Release the sequence's blocks (finish, abort, preemption). Registered full blocks
        stay in the prefix cache until evicted, so a recomputed sequence can hit them.

        Call it between steps, not between reserving a sequence's slots and running the step
        that writes them: blocks filled by that reservation are already registered, and a later
        hit would read K/V that were never written.
        """
        state = self._seq(seq_id)
        del self._seqs[seq_id]
        released: set[int] = set()
        # Tail first, as vLLM does: the LRU then evicts a prompt's tail before its head, and
        # heads are the part other requests share.
        for block_id in reversed(state.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                released.add(block_id)
                if block.key is not None:
                    self._free_cached[block_id] = None
                else:
                    self._free_uncached.append(block_id)
        # A copy into a block that is free again would be wasted, or clobber its next owner.
        self._pending_copies = [c for c in self._pending_copies if c[1] not in released]

    def invalidate(self, block_ids: Iterable[int]) -> None:
        """Drop these blocks from the prefix cache: a step that should have written their K/V
        failed, so a later hit must not read them. Sequences holding them keep them (the
        caller ends those too); a free one becomes an ordinary free block."""
        for block_id in block_ids:
            block = self._blocks[block_id]
            if block.key is None:
                continue
            if self._hash_to_block.get(block.key.hash) == block_id:
                del self._hash_to_block[block.key.hash]
            block.key = None
            if block_id in self._free_cached:
                del self._free_cached[block_id]
                self._free_uncached.append(block_id)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """Return and forget the `(src_block, dst_block)` copies copy-on-write requires.

        The runner performs them in list order (a later copy may read an earlier one's dst)
        before the step's cache writes.
        """
        copies, self._pending_copies = self._pending_copies, []
        return copies

    # ---- per-sequence views ---------------------------------------------------------------

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: int) -> list[int]:
        """Physical block ids of the sequence, in position order (a copy)."""
        return list(self._seq(seq_id).block_table)

    def num_cached_tokens(self, seq_id: int) -> int:
        return self._seq(seq_id).num_cached_tokens

    def num_reserved_tokens(self, seq_id: int) -> int:
        """Leading tokens whose slots have been handed out (computed, or being computed)."""
        return self._seq(seq_id).num_reserved_tokens

    def slot_mapping(self, seq_id: int, start: int, end: int) -> list[int]:
        """Slots of positions `[start, end)`, within the reserved tokens (later ones may still
        move to a fresh block by copy-on-write)."""
        state = self._seq(seq_id)
        if not 0 <= start <= end <= state.num_reserved_tokens:
            raise ValueError(
                f"sequence {seq_id}: positions [{start}, {end}) not within the "
                f"{state.num_reserved_tokens} reserved tokens"
            )
        bs = self.block_size
        table = state.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    # ---- internals ------------------------------------------------------------------------

    def _seq(self, seq_id: int) -> _SeqState:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise UnknownSequenceError(seq_id) from None

    def _num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _match_prefix(self, token_ids: Sequence[int]) -> list[tuple[BlockKey, int]]:
        """Leading full blocks of the prompt found in the cache, as (key, block id); at most
        (len - 1) // block_size of them, so the last token is left to compute."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[tuple[BlockKey, int]] = []
        parent: BlockKey | None = None
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = block_hash(None if parent is None else parent.hash, tokens)
            block_id = self._hash_to_block.get(h)
            if block_id is None:
                break
            stored = self._blocks[block_id].key
            if (stored is None or stored.token_ids != tokens
                    or not same_prefix(stored.parent, parent)):
                break  # a hash collision: a different prefix under the same hash
            hits.append((stored, block_id))
            parent = stored
        return hits

    def _blocks_needed_for_prompt(
        self, token_ids: Sequence[int], hits: list[tuple[BlockKey, int]] | None = None
    ) -> int:
        if hits is None:
            hits = self._match_prefix(token_ids)
        # A hit on a block in use costs nothing; a hit on a cached free block takes it from the
        # free pool just as a fresh block would.
        in_use = sum(1 for _key, block_id in hits if self._blocks[block_id].ref_count > 0)
        return self._num_blocks_for(len(token_ids)) - in_use

    def _blocks_needed_to_reserve(self, state: _SeqState, n: int) -> int:
        if n <= 0:
            return 0
        bs = self.block_size
        first = state.num_reserved_tokens // bs
        last = (state.num_reserved_tokens + n - 1) // bs
        needed = 0
        for i in range(first, last + 1):
            if i >= len(state.block_table) or self._blocks[state.block_table[i]].ref_count > 1:
                needed += 1
        return needed

    def _check_room(self, seq_id: int, state: _SeqState, n: int) -> None:
        needed = self._blocks_needed_to_reserve(state, n)
        if needed > self.num_free_blocks:
            raise OutOfBlocksError(
                f"sequence {seq_id}: {n} more slots need {needed} free blocks, "
                f"{self.num_free_blocks} free"
            )

    def _reserve(self, seq_id: int, state: _SeqState, n: int) -> list[int]:
        """Hand out slots for tokens [reserved, reserved + n), all already in token_ids."""
        if n == 0:  # touch nothing: a copy-on-write here would copy a block for no write
            return []
        self._check_room(seq_id, state, n)
        bs = self.block_size
        start = state.num_reserved_tokens
        end = start + n
        table = state.block_table
        for i in range(start // bs, self._num_blocks_for(end)):
            if i == len(table):
                table.append(self._take_fresh_block())
                continue
            shared = self._blocks[table[i]]
            if shared.ref_count > 1:
                # Copy-on-write: another sequence reads this block. Only the slots this
                # sequence already filled need copying; a block it has not written to yet
                # (a forked, unfinished prefill) just gets replaced.
                fresh = self._take_fresh_block()
                if i * bs < start:
                    self._pending_copies.append((shared.block_id, fresh))
                shared.ref_count -= 1
                table[i] = fresh
        state.num_reserved_tokens = end
        for i in range(start // bs, end // bs):  # blocks whose last slot is now reserved
            self._register_full_block(state, i)
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _register_full_block(self, state: _SeqState, index: int) -> None:
        bs = self.block_size
        parent = state.block_keys[index - 1] if index > 0 else None
        tokens = tuple(state.token_ids[index * bs : (index + 1) * bs])
        key = BlockKey(parent, tokens, block_hash(None if parent is None else parent.hash, tokens))
        state.block_keys.append(key)
        if not self.enable_prefix_caching or key.hash in self._hash_to_block:
            # Same content cached already (the recomputed last block of a fully cached prompt),
            # or a collision: the first block keeps the entry, this one stays uncached.
            return
        block = self._blocks[state.block_table[index]]
        block.key = key
        self._hash_to_block[key.hash] = block.block_id

    def _take_ref(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free_cached[block_id]  # revive from the LRU
        block.ref_count += 1

    def _take_fresh_block(self) -> int:
        """An unshared, unregistered block with ref count 1 (callers checked capacity)."""
        if self._free_uncached:
            block_id = self._free_uncached.popleft()
        elif self._free_cached:
            block_id, _ = self._free_cached.popitem(last=False)  # evict the least recently used
            key = self._blocks[block_id].key
            if key is None:
                raise KVCacheIntegrityError(f"block {block_id} in the cached free list has no hash")
            del self._hash_to_block[key.hash]
            self._blocks[block_id].key = None
        else:
            raise OutOfBlocksError("no free block")  # unreachable when callers check capacity
        self._blocks[block_id].ref_count = 1
        return block_id

    # ---- integrity ------------------------------------------------------------------------

    def integrity_check(self) -> None:
        """Check every bookkeeping invariant; raise `KVCacheIntegrityError` naming the first
        broken one. O(blocks + tokens): for tests and debug builds, not the step loop."""
        from .block_integrity import check_integrity

        check_integrity(self)
