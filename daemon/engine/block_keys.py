"""What a full KV block holds, as the prefix cache keys it: a chain hash over every token up to
the block's end, and the tokens themselves to confirm a hit (so a hash collision can never hand
one prompt another's K/V). Pure Python."""

from __future__ import annotations

from dataclasses import dataclass


def block_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chain hash of a full block: depends on every token before it through `parent_hash`.

    Python's tuple hash is fast and, for ints, the same in every process; collisions are
    harmless because a hit is confirmed against the stored tokens (tests replace this function
    with a constant). -1 stands for "no parent": `hash()` never returns it.
    """
    return hash((-1 if parent_hash is None else parent_hash, token_ids))


@dataclass(frozen=True, eq=False)
class BlockKey:
    """What a full block holds: its tokens and, through `parent`, every token before them.

    Comparing keys (`same_prefix`) compares the whole prefix, so a hash collision in any
    earlier block cannot produce a false hit. Sequences reuse the key objects of the blocks they
    hit, so the comparison usually stops at once on identity.
    """

    parent: BlockKey | None
    token_ids: tuple[int, ...]
    hash: int


def same_prefix(a: BlockKey | None, b: BlockKey | None) -> bool:
    while a is not b:  # iterative: prefixes can be thousands of blocks long
        if a is None or b is None or a.hash != b.hash or a.token_ids != b.token_ids:
            return False
        a, b = a.parent, b.parent
    return True
