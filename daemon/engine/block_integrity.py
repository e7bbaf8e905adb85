"""The block manager's bookkeeping invariants, checked all at once (`BlockManager.integrity_check`):
for tests and debug builds, not the step loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

from .block_keys import same_prefix

if TYPE_CHECKING:
    from .block_manager import BlockManager


def check_integrity(bm: BlockManager) -> None:
    """Raise `KVCacheIntegrityError` naming the first broken invariant. O(blocks + tokens)."""
    # the manager's own hash function, looked up now: tests replace it to force collisions
    from .block_manager import KVCacheIntegrityError, block_hash

    def fail(msg: str) -> NoReturn:
        raise KVCacheIntegrityError(msg)

    bs = bm.block_size
    refs = [0] * bm.num_blocks
    for seq_id, st in bm._seqs.items():
        table = st.block_table
        if len(set(table)) != len(table):
            fail(f"sequence {seq_id}: duplicate block in table {table}")
        if len(table) != bm._num_blocks_for(len(st.token_ids)):
            fail(f"sequence {seq_id}: {len(table)} blocks for {len(st.token_ids)} tokens")
        if not (st.num_cached_tokens % bs == 0 and st.num_cached_tokens < st.num_prompt_tokens
                and st.num_cached_tokens <= st.num_reserved_tokens <= len(st.token_ids)):
            fail(f"sequence {seq_id}: bad counts cached={st.num_cached_tokens} "
                 f"reserved={st.num_reserved_tokens} tokens={len(st.token_ids)}")
        if len(st.block_keys) != st.num_reserved_tokens // bs:
            fail(f"sequence {seq_id}: {len(st.block_keys)} block keys for "
                 f"{st.num_reserved_tokens} reserved tokens")
        for i, key in enumerate(st.block_keys):
            parent = st.block_keys[i - 1] if i > 0 else None
            tokens = tuple(st.token_ids[i * bs : (i + 1) * bs])
            if key.token_ids != tokens or not same_prefix(key.parent, parent):
                fail(f"sequence {seq_id}: key of block {i} does not match its tokens")
        for i, block_id in enumerate(table):
            if not 0 <= block_id < bm.num_blocks:
                fail(f"sequence {seq_id}: block id {block_id} out of range")
            refs[block_id] += 1
            stored = bm._blocks[block_id].key
            if stored is not None and (
                i >= len(st.block_keys) or not same_prefix(stored, st.block_keys[i])
            ):
                fail(f"sequence {seq_id}: cached block {block_id} (index {i}) holds other "
                     "tokens, or tokens not reserved yet")
    free_uncached, free_cached = list(bm._free_uncached), list(bm._free_cached)
    if len(set(free_uncached)) != len(free_uncached):
        fail("duplicate id in the uncached free list")
    if set(free_uncached) & set(free_cached):
        fail("block in both free lists")
    uncached_set = set(free_uncached)
    free = uncached_set | set(free_cached)
    for block in bm._blocks:
        bid = block.block_id
        if block.ref_count != refs[bid]:
            fail(f"block {bid}: ref count {block.ref_count}, in {refs[bid]} block tables")
        if (block.ref_count == 0) != (bid in free):
            fail(f"block {bid}: ref count {block.ref_count} but free={bid in free}")
        if bid in bm._free_cached and block.key is None:
            fail(f"block {bid}: in the cached free list without a hash")
        if bid in uncached_set and block.key is not None:
            fail(f"block {bid}: in the uncached free list with a hash")
        if block.key is not None and bm._hash_to_block.get(block.key.hash) != bid:
            fail(f"block {bid}: has a hash the prefix cache does not map to it")
    for h, bid in bm._hash_to_block.items():
        stored = bm._blocks[bid].key
        if stored is None or stored.hash != h or len(stored.token_ids) != bs:
            fail(f"prefix cache entry {h:#x} -> block {bid} does not match the block")
        parent_hash = None if stored.parent is None else stored.parent.hash
        if h != block_hash(parent_hash, stored.token_ids):
            fail(f"block {bid}: stored hash does not match its tokens")
    for src, dst in bm._pending_copies:
        if src == dst or bm._blocks[dst].ref_count == 0:
            fail(f"pending copy {src} -> {dst} is invalid")
