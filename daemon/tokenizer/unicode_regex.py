"""Unicode classes for the stdlib `re` engine, and pre-tokenizer regexes translated to it.

Pre-tokenizer regexes are written for Oniguruma (Hugging Face) or llama.cpp, which know
`\\p{L}`/`\\p{N}`; Python's `re` does not. The Unicode classes are built once from
`unicodedata` (about 0.3 s on first use) and inlined as code-point ranges. The classes are
kept to the BMP and any astral character is folded to a BMP stand-in of the same general
category before matching, because `re` tests astral ranges one by one and that made
matching ~4x slower.
"""
from __future__ import annotations

import functools
import itertools
import re
import unicodedata
from collections.abc import Iterable

from .errors import TokenizerError

__all__ = ["ASTRAL_RUN_RE", "WHITE_SPACE", "WHITE_SPACE_CHARS", "Ranges", "Regex", "UnicodeTables",
           "class_body", "unicode_tables"]

# The White_Space property: what Oniguruma (Hugging Face) and llama.cpp call \s.
# Python's own \s also matches U+001C..U+001F, so it cannot be used.
WHITE_SPACE: tuple[tuple[int, int], ...] = (
    (0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
    (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000),
)
WHITE_SPACE_CHARS = "".join(chr(c) for lo, hi in WHITE_SPACE for c in range(lo, hi + 1))

_CATEGORY_GROUPS: dict[str, tuple[str, ...]] = {
    "L": ("Lu", "Ll", "Lt", "Lm", "Lo"),
    "LC": ("Lu", "Ll", "Lt"),
    "L&": ("Lu", "Ll", "Lt"),
    "M": ("Mn", "Mc", "Me"),
    "N": ("Nd", "Nl", "No"),
    "P": ("Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po"),
    "S": ("Sm", "Sc", "Sk", "So"),
    "Z": ("Zs", "Zl", "Zp"),
    "C": ("Cc", "Cf", "Cs", "Co", "Cn"),
}
_CATEGORY_LONG_NAMES = {
    "letter": "L", "mark": "M", "number": "N", "punctuation": "P", "symbol": "S",
    "separator": "Z", "other": "C", "uppercase_letter": "Lu", "lowercase_letter": "Ll",
    "titlecase_letter": "Lt", "modifier_letter": "Lm", "other_letter": "Lo",
    "decimal_number": "Nd", "letter_number": "Nl", "other_number": "No",
    "nonspacing_mark": "Mn", "spacing_mark": "Mc", "enclosing_mark": "Me",
}
_ALL_CATEGORIES = frozenset(c for group in ("L", "M", "N", "P", "S", "Z", "C")
                            for c in _CATEGORY_GROUPS[group])
# Stand-ins for astral characters must not be whitespace and must not case-fold to ASCII
# (U+017F folds to "s", U+212A to "k", ...), or `(?i:'s)` could match them.
_NO_STAND_IN = frozenset({0x130, 0x131, 0x17F, 0x212A, 0x212B})

ASTRAL_RUN_RE = re.compile("[\U00010000-\U0010ffff]+")

Ranges = list[tuple[int, int]]


class UnicodeTables:
    """General-category ranges of every code point, per this Python's `unicodedata`."""

    def __init__(self) -> None:
        category = unicodedata.category
        self.runs: list[tuple[int, int, str]] = []
        start = 0
        for cat, group in itertools.groupby(category(chr(cp)) for cp in range(0x110000)):
            length = sum(1 for _ in group)
            self.runs.append((start, start + length - 1, cat))
            start += length
        avoid = {cp for lo, hi in WHITE_SPACE for cp in range(lo, hi + 1)} | _NO_STAND_IN
        self.stand_in: dict[str, str] = {}
        for lo, hi, cat in self.runs:
            if cat in self.stand_in or cat == "Cs" or hi < 0x80 or lo > 0xFFFF:
                continue
            for cp in range(max(lo, 0x80), min(hi, 0xFFFF) + 1):
                if cp not in avoid:
                    self.stand_in[cat] = chr(cp)
                    break
        self._cache: dict[frozenset[str], Ranges] = {}

    def category_ranges(self, categories: frozenset[str]) -> Ranges:
        cached = self._cache.get(categories)
        if cached is None:
            cached = []
            for lo, hi, cat in self.runs:
                if cat in categories:
                    if cached and cached[-1][1] == lo - 1:
                        cached[-1] = (cached[-1][0], hi)
                    else:
                        cached.append((lo, hi))
            self._cache[categories] = cached
        return cached

    def property_ranges(self, name: str) -> Ranges:
        key = _CATEGORY_LONG_NAMES.get(name.lower().replace(" ", "_"), name)
        if key in _CATEGORY_GROUPS:
            return self.category_ranges(frozenset(_CATEGORY_GROUPS[key]))
        if key in _ALL_CATEGORIES:
            return self.category_ranges(frozenset({key}))
        raise TokenizerError(f"unsupported Unicode property \\p{{{name}}} in a pre-tokenizer regex")

    def fold_astral(self, text: str) -> str:
        """Replace each astral character by a BMP character of the same general category."""
        stand_in = self.stand_in
        category = unicodedata.category
        return ASTRAL_RUN_RE.sub(
            lambda m: "".join(stand_in[category(ch)] for ch in m.group()), text
        )


@functools.lru_cache(maxsize=1)
def unicode_tables() -> UnicodeTables:
    """The process-wide tables, built on first use."""
    return UnicodeTables()


def _complement(ranges: Iterable[tuple[int, int]]) -> Ranges:
    out: Ranges = []
    nxt = 0
    for lo, hi in sorted(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = max(nxt, hi + 1)
    if nxt <= 0x10FFFF:
        out.append((nxt, 0x10FFFF))
    return out


def class_body(ranges: Iterable[tuple[int, int]], bmp_only: bool) -> str:
    """Code-point ranges -> the inside of a `re` character class."""
    parts = []
    for lo, hi in ranges:
        if bmp_only:
            if lo > 0xFFFF:
                continue
            hi = min(hi, 0xFFFF)
        parts.append(f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}")
    return "".join(parts)


_ESCAPE_CLASSES: dict[str, tuple[str, bool]] = {
    # escape -> (what it means, negated)
    "s": ("space", False), "S": ("space", True),
    "d": ("Nd", False), "D": ("Nd", True),
    "w": ("word", False), "W": ("word", True),
    "h": ("hex", False), "H": ("hex", True),
}
_UNSUPPORTED_ESCAPES = frozenset("RXKGyYNOgk")


def _escape_ranges(kind: str) -> Ranges:
    if kind == "space":
        return list(WHITE_SPACE)
    if kind == "hex":
        return [(0x30, 0x39), (0x41, 0x46), (0x61, 0x66)]
    tables = unicode_tables()
    if kind == "word":  # Oniguruma's Unicode \w: letters, marks, decimal digits, connectors
        return tables.category_ranges(frozenset(_CATEGORY_GROUPS["L"] + _CATEGORY_GROUPS["M"]
                                                + ("Nd", "Pc")))
    return tables.category_ranges(frozenset({kind}))


def _translate_regex(pattern: str, bmp_only: bool) -> tuple[str, bool]:
    """Oniguruma/PCRE-style pattern (as in tokenizer.json and llama.cpp) -> stdlib `re`.

    Returns the pattern and whether it has non-ASCII literals, which make folding astral
    characters to BMP stand-ins unsafe (a stand-in could equal a literal).
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    non_ascii = False

    def emit(ranges: Ranges, negate: bool) -> None:
        if negate:
            ranges = _complement(ranges)
        body = class_body(ranges, bmp_only)
        if in_class:
            out.append(body)
        else:
            out.append(f"[{body}]" if body else "(?!)")

    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise TokenizerError(f"pre-tokenizer regex ends with a backslash: {pattern!r}")
            e = pattern[i + 1]
            if e in "pP":
                if pattern.startswith("{", i + 2):
                    close = pattern.find("}", i + 3)
                    if close < 0:
                        raise TokenizerError(f"unterminated \\p{{ in pre-tokenizer regex {pattern!r}")
                    name, i = pattern[i + 3:close], close + 1
                else:
                    name, i = pattern[i + 2:i + 3], i + 3
                negate = e == "P"
                if name.startswith("^"):
                    negate, name = not negate, name[1:]
                emit(unicode_tables().property_ranges(name), negate)
                continue
            if e in _ESCAPE_CLASSES:
                kind, negate = _ESCAPE_CLASSES[e]
                emit(_escape_ranges(kind), negate)
                i += 2
                continue
            if e in _UNSUPPORTED_ESCAPES:
                raise TokenizerError(f"unsupported escape \\{e} in pre-tokenizer regex {pattern!r}")
            if e == "z":
                out.append(r"\Z")
                i += 2
                continue
            if e == "x" and pattern.startswith("{", i + 2):
                close = pattern.find("}", i + 3)
                cp = int(pattern[i + 3:close], 16)
                non_ascii |= cp > 0x7F
                out.append(f"\\U{cp:08x}")
                i = close + 1
                continue
            if e in "uU":
                width = 4 if e == "u" else 8
                non_ascii |= int(pattern[i + 2:i + 2 + width], 16) > 0x7F
                out.append(pattern[i:i + 2 + width])
                i += 2 + width
                continue
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if ord(c) > 0x7F:
            non_ascii = True
        if in_class:
            if c == "]":
                in_class = False
            elif c == "[" or pattern.startswith("&&", i):
                raise TokenizerError(
                    f"nested character classes are not supported in pre-tokenizer regex {pattern!r}"
                )
            out.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            # A leading "^" and a "]" right after the opening are literal parts of the class.
            if pattern.startswith("^", i):
                out.append("^")
                i += 1
            if pattern.startswith("]", i):
                out.append(r"\]")
                i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out), non_ascii


class Regex:
    """One pre-tokenizer regex compiled for the stdlib engine, with astral folding if safe."""

    def __init__(self, pattern: str) -> None:
        try:
            bmp, non_ascii = _translate_regex(pattern, bmp_only=True)
            self.fold = not non_ascii
            self.compiled = re.compile(bmp if self.fold else _translate_regex(pattern, False)[0])
        except TokenizerError:  # a ValueError too: pass it on as it is
            raise
        except (re.error, ValueError) as exc:  # ValueError: a malformed \x{..} or \u escape
            raise TokenizerError(f"cannot compile pre-tokenizer regex {pattern!r}: {exc}") from None
