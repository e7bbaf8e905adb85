"""Byte-level BPE: the GPT-2 byte alphabet and the merge loop, behind a bounded cache.

Vocabulary entries and merges spell bytes with printable characters (GPT-2's
`bytes_to_unicode`); a piece of text is spelled the same way, then merged pair by pair,
lowest rank first.
"""
from __future__ import annotations

import heapq
import itertools
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["BYTE_TO_CHAR", "DEFAULT_CACHE_SIZE", "NOT_ALPHABET_RE", "BytePairEncoder", "spell",
           "unspell"]

DEFAULT_CACHE_SIZE = 1 << 16
# Pieces longer than this are not cached: they rarely repeat and would pin memory.
_MAX_CACHED_PIECE = 256
# From about this many bytes per piece on, the heap-based merge loop beats the list scan
# (measured: equal at 32, heap 2x faster at 128).
_HEAP_BPE_THRESHOLD = 40


def _bytes_to_unicode() -> list[str]:
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Indexed by byte value; also a str.translate table for latin-1-decoded bytes.
BYTE_TO_CHAR: list[str] = _bytes_to_unicode()
# For str.translate on a spelled token: alphabet character -> latin-1 character of its byte.
_SPELLED_TO_LATIN1: dict[int, int] = {ord(ch): b for b, ch in enumerate(BYTE_TO_CHAR)}
NOT_ALPHABET_RE = re.compile("[^" + "".join(re.escape(ch) for ch in sorted(BYTE_TO_CHAR)) + "]")


def spell(text: str) -> str:
    """Raw text -> the byte-level spelling used by vocab entries and merges."""
    return text.encode("utf-8").decode("latin-1").translate(BYTE_TO_CHAR)


def unspell(token: str) -> bytes:
    """Vocab entry -> bytes. Entries outside the byte alphabet are stored as raw text
    (converters do that for added tokens), and Hugging Face decodes those as their UTF-8."""
    if NOT_ALPHABET_RE.search(token):
        return token.encode("utf-8")
    return token.translate(_SPELLED_TO_LATIN1).encode("latin-1")


class BytePairEncoder:
    """Pre-tokenized piece -> token ids by rank-ordered merges, behind a bounded cache.

    vocab maps byte-level spellings to ids; merges are pairs of spellings, best first.
    `cache` maps a piece (raw text) to its ids; callers may read it directly to skip a call.
    """

    def __init__(self, vocab: dict[str, int], merges: Iterable[tuple[str, str]], *,
                 ignore_merges: bool = False, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.vocab = vocab
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, pair in enumerate(merges):
            self._ranks.setdefault(pair, rank)
        self._ignore_merges = ignore_merges
        self.cache: dict[str, tuple[int, ...]] = {}
        self._cache_size = max(0, int(cache_size))

    def encode(self, piece: str) -> tuple[int, ...]:
        """The ids of one pre-tokenized piece of raw text; caches the result."""
        if not piece:  # a custom regex can match empty strings
            return ()
        word = spell(piece)
        vocab = self.vocab
        tid = vocab.get(word)
        if tid is not None and (self._ignore_merges or len(word) == 1):
            ids: tuple[int, ...] = (tid,)
        else:
            symbols = self.merge(word) if len(word) <= _HEAP_BPE_THRESHOLD else self.merge_heap(word)
            result: list[int] = []
            for sym in symbols:
                tid = vocab.get(sym)
                if tid is not None:
                    result.append(tid)
                else:  # no such token (inconsistent merges): fall back to bytes, as llama.cpp does
                    result.extend(vocab[ch] for ch in sym if ch in vocab)
            ids = tuple(result)
        if self._cache_size and len(piece) <= _MAX_CACHED_PIECE:
            cache = self.cache
            if len(cache) >= self._cache_size:
                # Drop the oldest half (dicts keep insertion order): amortised O(1), and
                # unlike clearing everything it keeps the recent working set warm.
                for key in list(itertools.islice(cache, len(cache) // 2 + 1)):
                    cache.pop(key, None)
            cache[piece] = ids
        return ids

    def merge(self, word: str) -> list[str]:
        """Apply merges lowest rank first, leftmost first on ties (as llama.cpp and Hugging
        Face do), one merge at a time."""
        symbols = list(word)
        get = self._ranks.get
        none = 1 << 62
        ranks = [get(pair, none) for pair in itertools.pairwise(symbols)]
        while ranks:
            best = min(ranks)
            if best == none:
                break
            i = ranks.index(best)
            merged = symbols[i] + symbols[i + 1]
            symbols[i:i + 2] = [merged]
            del ranks[i]
            if i > 0:
                ranks[i - 1] = get((symbols[i - 1], merged), none)
            if i < len(ranks):
                ranks[i] = get((merged, symbols[i + 1]), none)
        return symbols

    def merge_heap(self, word: str) -> list[str]:
        """Same merge order as `merge`, O(n log n) for long pieces (whitespace runs, blobs)."""
        # None marks a symbol merged into its left neighbour.
        symbols: list[Any] = list(word)
        n = len(symbols)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        get = self._ranks.get
        heap: list[tuple[int, int, str, str]] = []
        for i in range(n - 1):
            r = get((word[i], word[i + 1]))
            if r is not None:
                heap.append((r, i, word[i], word[i + 1]))
        heapq.heapify(heap)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i]
            # Entries go stale when a neighbour merged first; the texts tell.
            if symbols[i] != left or j < 0 or symbols[j] != right:
                continue
            merged = left + right
            symbols[i] = merged
            symbols[j] = None
            k = nxt[j]
            nxt[i] = k
            if k >= 0:
                prv[k] = i
                r = get((merged, symbols[k]))
                if r is not None:
                    heapq.heappush(heap, (r, i, merged, symbols[k]))
            p = prv[i]
            if p >= 0:
                r = get((symbols[p], merged))
                if r is not None:
                    heapq.heappush(heap, (r, p, symbols[p], merged))
        return [s for s in symbols if s is not None]

    def clear_cache(self) -> None:
        self.cache.clear()
