"""Byte-level BPE tokenizer (GPT-2 family) in pure Python.

This module owns text <-> token-id conversion for the daemon:

* loading a vocabulary from GGUF metadata (`tokenizer.ggml.*`, the way llama.cpp's
  `llama-vocab.cpp` reads it) or from a Hugging Face folder (`tokenizer.json` +
  `tokenizer_config.json`);
* encoding: added/special tokens are cut out of the raw text first (leftmost, longest
  first), the rest is pre-tokenized with the regexes llama.cpp picks for
  `tokenizer.ggml.pre`, and every piece goes through rank-ordered BPE merges, behind a
  bounded piece -> ids cache;
* decoding, in one go or incrementally for streaming (never half a UTF-8 character).

Only the standard library, numpy and `gguf` are used at run time. Python's `re` has no
`\\p{L}`/`\\p{N}`, so the Unicode classes are built once from `unicodedata` (about 0.3 s on
first use) and inlined as code-point ranges. The classes are kept to the BMP and any
astral character is folded to a BMP stand-in of the same general category before
matching, because `re` tests astral ranges one by one and that made matching ~4x slower.
"""
from __future__ import annotations

import codecs
import functools
import heapq
import itertools
import json
import logging
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # gguf is imported lazily: only the GGUF loaders need it
    import gguf

__all__ = ["IncrementalDetokenizer", "Tokenizer", "TokenizerError"]

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """The tokenizer cannot be built from what it was given, or was misused (bad token id)."""


# llama.cpp token types (tokenizer.ggml.token_type).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# Token texts llama.cpp treats as end-of-generation whatever the metadata says.
_EOG_TEXTS = frozenset(
    {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>"}
)
_FIM_EOG_TEXTS = frozenset({"<|fim_pad|>", "<fim-pad>", "<PAD>", "<|fim_repo|>", "<|repo_name|>",
                            "<fim-repo>", "<REPO>", "<|file_sep|>"})

DEFAULT_CACHE_SIZE = 1 << 16
# Pieces longer than this are not cached: they rarely repeat and would pin memory.
_MAX_CACHED_PIECE = 256
# From about this many bytes per piece on, the heap-based merge loop beats the list scan
# (measured: equal at 32, heap 2x faster at 128).
_HEAP_BPE_THRESHOLD = 40


# --------------------------------------------------------------------------------------
# GPT-2 byte <-> printable-character alphabet
# --------------------------------------------------------------------------------------

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
_BYTE_TO_CHAR: list[str] = _bytes_to_unicode()
# For str.translate on a spelled token: alphabet character -> latin-1 character of its byte.
_SPELLED_TO_LATIN1: dict[int, int] = {ord(ch): b for b, ch in enumerate(_BYTE_TO_CHAR)}
_NOT_ALPHABET_RE = re.compile("[^" + "".join(re.escape(ch) for ch in sorted(_BYTE_TO_CHAR)) + "]")


def _spell(text: str) -> str:
    """Raw text -> the byte-level spelling used by vocab entries and merges."""
    return text.encode("utf-8").decode("latin-1").translate(_BYTE_TO_CHAR)


def _unspell(token: str) -> bytes:
    """Vocab entry -> bytes. Entries outside the byte alphabet are stored as raw text
    (converters do that for added tokens), and Hugging Face decodes those as their UTF-8."""
    if _NOT_ALPHABET_RE.search(token):
        return token.encode("utf-8")
    return token.translate(_SPELLED_TO_LATIN1).encode("latin-1")


# --------------------------------------------------------------------------------------
# Unicode classes for the stdlib `re` engine
# --------------------------------------------------------------------------------------

# The White_Space property: what Oniguruma (Hugging Face) and llama.cpp call \s.
# Python's own \s also matches U+001C..U+001F, so it cannot be used.
_WHITE_SPACE: tuple[tuple[int, int], ...] = (
    (0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
    (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000),
)
_WHITE_SPACE_CHARS = "".join(chr(c) for lo, hi in _WHITE_SPACE for c in range(lo, hi + 1))

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

Ranges = list[tuple[int, int]]


class _UnicodeTables:
    """General-category ranges of every code point, per this Python's `unicodedata`."""

    def __init__(self) -> None:
        category = unicodedata.category
        self.runs: list[tuple[int, int, str]] = []
        start = 0
        for cat, group in itertools.groupby(category(chr(cp)) for cp in range(0x110000)):
            length = sum(1 for _ in group)
            self.runs.append((start, start + length - 1, cat))
            start += length
        avoid = {cp for lo, hi in _WHITE_SPACE for cp in range(lo, hi + 1)} | _NO_STAND_IN
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
        return _ASTRAL_RUN_RE.sub(
            lambda m: "".join(stand_in[category(ch)] for ch in m.group()), text
        )


_ASTRAL_RUN_RE = re.compile("[\U00010000-\U0010ffff]+")


@functools.lru_cache(maxsize=1)
def _unicode() -> _UnicodeTables:
    return _UnicodeTables()


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


def _class_body(ranges: Iterable[tuple[int, int]], bmp_only: bool) -> str:
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
        return list(_WHITE_SPACE)
    if kind == "hex":
        return [(0x30, 0x39), (0x41, 0x46), (0x61, 0x66)]
    tables = _unicode()
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
        body = _class_body(ranges, bmp_only)
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
                emit(_unicode().property_ranges(name), negate)
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


class _Regex:
    """One pre-tokenizer regex compiled for the stdlib engine, with astral folding if safe."""

    def __init__(self, pattern: str) -> None:
        self.source = pattern
        try:
            bmp, non_ascii = _translate_regex(pattern, bmp_only=True)
            self.fold = not non_ascii
            self.compiled = re.compile(bmp if self.fold else _translate_regex(pattern, False)[0])
        except TokenizerError:
            raise
        except (re.error, ValueError) as exc:  # ValueError: a malformed \x{..} or \u escape
            raise TokenizerError(f"cannot compile pre-tokenizer regex {pattern!r}: {exc}") from None


# --------------------------------------------------------------------------------------
# Pre-tokenizers
# --------------------------------------------------------------------------------------

# The regexes llama.cpp's llm_tokenizer_bpe uses, in its own spelling.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's smollm/starcoder: every \p{N} on its own, then GPT-2 on the stretches between.
# Fused into one regex: a digit acts as the end of a stretch, so `\s+(?!\S)` may stop before
# one, and ` ?\p{N}+` can never match.
_DIGITS_THEN_GPT2 = (r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+"
                     r"|\s+(?![^\s\p{N}])|\s+")
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> (regex stages, ignore_merges, add_bos default), from llama-vocab.cpp.
_GGUF_PRE: dict[str, tuple[tuple[str, ...], bool, bool]] = {}
for _names, _stages, _ignore_merges, _add_bos in (
    (("default",), _DEFAULT, False, False),
    (("gpt-2", "phi-2", "roberta-bpe", "jina-es", "jina-de", "gigachat", "jina-v1-en",
      "jina-v2-es", "jina-v2-de", "jina-v2-code", "mpt", "olmo", "jais"), (_GPT2,), False, False),
    (("llama3", "llama-v3", "llama-bpe", "falcon3"), (_LLAMA3,), True, True),
    (("dbrx", "smaug-bpe", "chatglm-bpe"), (_LLAMA3,), False, False),
    (("qwen2", "stablelm2", "megrez", "deepseek-r1-qwen"), (_QWEN2,), False, False),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
     (r"\p{N}", _GPT2), False, False),
):
    for _name in _names:
        _GGUF_PRE[_name] = (_stages, _ignore_merges, _add_bos)
SUPPORTED_GGUF_PRE = tuple(sorted(_GGUF_PRE))

# Stage lists that have an equivalent single regex covering every character.
_FUSED_STAGES = {(r"\p{N}", _GPT2): _DIGITS_THEN_GPT2}

_PREFIX_SPACE = "prefix-space"  # ByteLevel(add_prefix_space=True) as a stage


class _PreTokenizer:
    """Cuts text into pieces for BPE.

    Each regex stage re-splits every piece the way Hugging Face's `Split(behavior="isolated")`
    and llama.cpp's `unicode_regex_split` do: matches and the stretches between them are
    both pieces. A lone regex that covers all the text runs as one `findall`, in C.
    """

    def __init__(self, stages: Sequence[str]) -> None:
        stages = tuple(stages)
        stages = (_FUSED_STAGES[stages],) if stages in _FUSED_STAGES else stages
        self.stages: list[_Regex | None] = [
            None if s == _PREFIX_SPACE else _Regex(s) for s in stages
        ]
        regexes = [s for s in self.stages if s is not None]
        self._fold = all(r.fold for r in regexes)
        single = self.stages[0] if len(self.stages) == 1 else None
        self._findall = single.compiled.findall if single and single.compiled.groups == 0 else None
        self._tables = _unicode()

    def split(self, text: str) -> list[str]:
        if not text:
            return []
        folded = text
        if self._fold and not text.isascii() and _ASTRAL_RUN_RE.search(text):
            folded = self._tables.fold_astral(text)
        if self._findall is not None:
            pieces = self._findall(folded)
            # Gaps (characters no alternative matched) make the lengths fall short.
            if sum(map(len, pieces)) == len(text):
                if folded is text:
                    return pieces
                return _unfold(text, pieces)
        return self._split_staged(text, folded)

    def _split_staged(self, text: str, folded: str) -> list[str]:
        pieces: list[tuple[str, str]] = [(text, folded)]
        for stage in self.stages:
            if stage is None:
                pieces = [(o, f) if o.startswith(" ") else (" " + o, " " + f) for o, f in pieces]
                continue
            finditer = stage.compiled.finditer
            nxt: list[tuple[str, str]] = []
            for orig, fold in pieces:
                pos = 0
                for m in finditer(fold):
                    start, end = m.span()
                    if start == end:
                        continue
                    if start > pos:
                        nxt.append((orig[pos:start], fold[pos:start]))
                    nxt.append((orig[start:end], fold[start:end]))
                    pos = end
                if pos < len(orig):
                    nxt.append((orig[pos:], fold[pos:]))
            pieces = nxt
        return [o for o, _ in pieces]


def _unfold(text: str, pieces: list[str]) -> list[str]:
    out = []
    pos = 0
    for piece in pieces:
        end = pos + len(piece)
        out.append(text[pos:end])
        pos = end
    return out


# --------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------

class Tokenizer:
    """Byte-level BPE tokenizer. Build it with `from_gguf`, `from_gguf_reader` or `from_hf_dir`."""

    def __init__(
        self,
        *,
        tokens: Sequence[str],
        token_types: Sequence[int] | None,
        merges: Iterable[tuple[str, str]],
        pre_stages: Sequence[str],
        pre_name: str = "custom",
        ignore_merges: bool = False,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        extra_eog_ids: Iterable[int] = (),
        extra_special_ids: Iterable[int] = (),
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        normalizer: _UnicodeForm | None = None,
        strip_around: dict[int, tuple[bool, bool]] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        n = len(tokens)
        if n == 0:
            raise TokenizerError("the vocabulary is empty")
        types = list(token_types) if token_types is not None else [TOKEN_NORMAL] * n
        if len(types) != n:
            raise TokenizerError(f"{len(types)} token types for {n} tokens")
        self.vocab_size: int = n
        self.pre_tokenizer_name: str = pre_name
        self._tokens = list(tokens)
        self._types = types
        self._pre = _PreTokenizer(pre_stages)
        self._ignore_merges = ignore_merges
        self._normalizer = normalizer

        # BPE lookup is by byte-level spelling; control/user-defined tokens are stored as raw
        # text, and a normal token wins over them if both spell the same.
        vocab: dict[str, int] = {}
        for tid, (tok, ttype) in enumerate(zip(tokens, types)):
            if tok and ttype in (TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_BYTE):
                vocab.setdefault(tok if not _NOT_ALPHABET_RE.search(tok) else _spell(tok), tid)
        for tid, (tok, ttype) in enumerate(zip(tokens, types)):
            if tok and ttype not in (TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_BYTE):
                vocab.setdefault(_spell(tok), tid)
        self._vocab = vocab
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, pair in enumerate(merges):
            self._ranks.setdefault(pair, rank)

        self._token_bytes: list[bytes] = [self._bytes_of(t, ty) for t, ty in zip(tokens, types)]

        def valid(tid: int | None, what: str) -> int | None:
            if tid is None:
                return None
            if not 0 <= tid < n:
                log.warning("ignoring %s token id %d: outside the vocabulary of %d", what, tid, n)
                return None
            return int(tid)

        self.bos_token_id: int | None = valid(bos_token_id, "BOS")
        self.eos_token_id: int | None = valid(eos_token_id, "EOS")
        self.bos_token: str | None = None if self.bos_token_id is None else tokens[self.bos_token_id]
        self.eos_token: str | None = None if self.eos_token_id is None else tokens[self.eos_token_id]
        self.add_bos_token: bool = bool(add_bos_token)
        self.add_eos_token: bool = bool(add_eos_token)
        self.chat_template: str | None = chat_template

        eog = {t for t in (valid(i, "end-of-generation") for i in extra_eog_ids) if t is not None}
        if self.eos_token_id is not None:
            eog.add(self.eos_token_id)
        for tid, (tok, ttype) in enumerate(zip(tokens, types)):
            if tok in _EOG_TEXTS or (tok in _FIM_EOG_TEXTS and ttype != TOKEN_NORMAL):
                eog.add(tid)
        self.eos_token_ids: frozenset[int] = frozenset(eog)

        special = {tid for tid, ttype in enumerate(types) if ttype in (TOKEN_CONTROL, TOKEN_UNKNOWN)}
        special.update(t for t in (valid(i, "special") for i in extra_special_ids) if t is not None)
        special.update(t for t in (self.bos_token_id, self.eos_token_id) if t is not None)
        self.special_ids: frozenset[int] = frozenset(special)

        # Added tokens are matched in the raw text: longest first at the leftmost position,
        # which is what an alternation sorted by length gives.
        added: dict[str, int] = {}
        for tid, (tok, ttype) in enumerate(zip(tokens, types)):
            if ttype in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and tok:
                added.setdefault(tok, tid)
        self._added = added
        self._strip_around = strip_around or {}
        self._added_re = self._added_regex(added)
        self._user_added_re = self._added_regex(
            {t: i for t, i in added.items() if types[i] == TOKEN_USER_DEFINED}
        )

        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_size = max(0, int(cache_size))

    # ---- construction helpers ------------------------------------------------------

    @staticmethod
    def _bytes_of(token: str, ttype: int) -> bytes:
        if ttype in (TOKEN_NORMAL, TOKEN_UNUSED):
            return _unspell(token)
        if ttype == TOKEN_BYTE:
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
            return bytes([int(m.group(1), 16)]) if m else _unspell(token)
        return token.encode("utf-8")

    def _added_regex(self, added: dict[str, int]) -> re.Pattern[str] | None:
        if not added:
            return None
        ws = "[" + _class_body(_WHITE_SPACE, bmp_only=False) + "]*"
        alternatives = []
        for text in sorted(added, key=lambda t: (-len(t), t)):
            lstrip, rstrip = self._strip_around.get(added[text], (False, False))
            alternatives.append((ws if lstrip else "") + re.escape(text) + (ws if rstrip else ""))
        return re.compile("|".join(alternatives))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], **kwargs: Any) -> Tokenizer:
        """Read the tokenizer from a GGUF file's metadata."""
        import gguf

        try:
            reader = gguf.GGUFReader(os.fspath(path), "r")
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"cannot read GGUF file {os.fspath(path)!r}: {exc}") from exc
        return cls.from_gguf_reader(reader, **kwargs)

    @classmethod
    def from_gguf_reader(cls, reader: gguf.GGUFReader, **kwargs: Any) -> Tokenizer:
        """Build from an open `gguf.GGUFReader`, so the weight loader can share one reader."""
        fields = reader.fields

        def get(key: str, default: Any = None) -> Any:
            field = fields.get(key)
            return default if field is None else _field_value(field, key)

        model = get("tokenizer.ggml.model")
        if model is None:
            raise TokenizerError("GGUF has no tokenizer (tokenizer.ggml.model is missing)")
        if model != "gpt2":
            kind = {"llama": "SentencePiece", "bert": "WordPiece", "t5": "Unigram",
                    "rwkv": "RWKV"}.get(model, "unknown")
            raise TokenizerError(
                f"unsupported tokenizer type {model!r} ({kind}); only byte-level BPE ('gpt2') is supported"
            )
        pre = get("tokenizer.ggml.pre")
        if pre is None:
            log.warning("GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer")
            pre = "default"
        if pre not in _GGUF_PRE:
            raise TokenizerError(
                f"unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
                + ", ".join(SUPPORTED_GGUF_PRE)
            )
        stages, ignore_merges, add_bos_default = _GGUF_PRE[pre]
        tokens = get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError("GGUF has no tokenizer.ggml.tokens")
        merges_raw = get("tokenizer.ggml.merges")
        if merges_raw is None:
            raise TokenizerError("GGUF has no tokenizer.ggml.merges")
        token_types = get("tokenizer.ggml.token_type")
        add_bos = get("tokenizer.ggml.add_bos_token")
        template = get("tokenizer.chat_template")
        extra_eog = [v for v in (get(f"tokenizer.ggml.{k}_token_id") for k in
                                 ("eot", "eom", "fim_pad", "fim_rep", "fim_sep")) if v is not None]
        return cls(
            tokens=tokens,
            token_types=token_types,
            merges=_split_merges(merges_raw),
            pre_stages=stages,
            pre_name=pre,
            ignore_merges=ignore_merges,
            bos_token_id=get("tokenizer.ggml.bos_token_id"),
            eos_token_id=get("tokenizer.ggml.eos_token_id"),
            extra_eog_ids=extra_eog,
            extra_special_ids=[v for v in (get("tokenizer.ggml.unknown_token_id"),
                                           get("tokenizer.ggml.padding_token_id")) if v is not None],
            add_bos_token=add_bos_default if add_bos is None else bool(add_bos),
            add_eos_token=bool(get("tokenizer.ggml.add_eos_token", False)),
            chat_template=template,
            **kwargs,
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str], **kwargs: Any) -> Tokenizer:
        """Build from a Hugging Face folder: tokenizer.json (+ tokenizer_config.json,
        generation_config.json, chat_template.jinja when present)."""
        folder = Path(path)
        try:
            spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"cannot read {folder / 'tokenizer.json'}: {exc}") from exc
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")

        model = spec.get("model") or {}
        if model.get("type", "BPE") != "BPE":
            raise TokenizerError(f"unsupported tokenizer type {model.get('type')!r}; only byte-level BPE")
        if model.get("byte_fallback") or model.get("continuing_subword_prefix") \
                or model.get("end_of_word_suffix"):
            raise TokenizerError("unsupported BPE options (byte_fallback / subword prefix or suffix)")
        stages, byte_level = _hf_pre_stages(spec.get("pre_tokenizer"))
        if not byte_level:
            raise TokenizerError("tokenizer.json is not byte-level BPE (no ByteLevel pre-tokenizer)")
        normalizer = _hf_normalizer(spec.get("normalizer"))

        vocab: dict[str, int] = model.get("vocab") or {}
        added_tokens: list[dict[str, Any]] = spec.get("added_tokens") or []
        size = max([*vocab.values(), *(t["id"] for t in added_tokens)], default=-1) + 1
        tokens = [""] * size
        types = [TOKEN_UNUSED] * size
        for text, tid in vocab.items():
            tokens[tid] = text
            types[tid] = TOKEN_NORMAL
        strip_around: dict[int, tuple[bool, bool]] = {}
        for tok in added_tokens:
            tid = tok["id"]
            tokens[tid] = tok["content"]
            types[tid] = TOKEN_CONTROL if tok.get("special") else TOKEN_USER_DEFINED
            if tok.get("lstrip") or tok.get("rstrip"):
                strip_around[tid] = (bool(tok.get("lstrip")), bool(tok.get("rstrip")))

        merges: list[tuple[str, str]] = []
        for m in model.get("merges") or []:
            if isinstance(m, str):
                merges.extend(_split_merges([m]))
            else:
                merges.append((m[0], m[1]))

        ids = {t: i for i, t in enumerate(tokens) if t}

        def token_id(entry: Any) -> int | None:
            text = entry.get("content") if isinstance(entry, dict) else entry
            return ids.get(text) if isinstance(text, str) else None

        bos = token_id(config.get("bos_token"))
        eos = token_id(config.get("eos_token"))
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = bos is not None and _post_processor_adds(spec.get("post_processor"), bos, tokens)
        eog = generation.get("eos_token_id")
        eog_ids = [eog] if isinstance(eog, int) else list(eog or [])
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(
            tokens=tokens,
            token_types=types,
            merges=merges,
            pre_stages=stages,
            pre_name="tokenizer.json",
            ignore_merges=bool(model.get("ignore_merges", False)),
            bos_token_id=bos,
            eos_token_id=eos,
            extra_eog_ids=eog_ids,
            extra_special_ids=[i for i in (token_id(config.get("unk_token")),
                                           token_id(config.get("pad_token"))) if i is not None],
            add_bos_token=bool(add_bos),
            add_eos_token=bool(config.get("add_eos_token", False)),
            chat_template=template,
            normalizer=normalizer,
            strip_around=strip_around,
            **kwargs,
        )

    # ---- encoding ------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False, *,
               parse_special: bool = True) -> list[int]:
        """Text -> token ids.

        add_special_tokens: prepend BOS (append EOS) only where the model asks for it.
        parse_special: False leaves control tokens like `<|im_start|>` in the text as plain
        text (for untrusted input); user-defined added tokens are still matched, as in llama.cpp.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes str, not {type(text).__name__}")
        out: list[int] = []
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            out.append(self.bos_token_id)
        if not text.isascii():
            # Lone surrogates (e.g. from JSON "\ud800") cannot be UTF-8 encoded: each becomes
            # one U+FFFD, as invalid input does in llama.cpp; a split pair is rejoined.
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        matcher = self._added_re if parse_special else self._user_added_re
        if matcher is None:
            self._encode_text(text, out)
        else:
            pos = 0
            for m in matcher.finditer(text):
                start, end = m.span()
                if start > pos:
                    self._encode_text(text[pos:start], out)
                out.append(self._added_id(m.group()))
                pos = end
            if pos < len(text):
                self._encode_text(text[pos:], out)
        if add_special_tokens and self.add_eos_token and self.eos_token_id is not None:
            out.append(self.eos_token_id)
        return out

    def _added_id(self, matched: str) -> int:
        tid = self._added.get(matched)
        if tid is None:  # the match carries whitespace taken by lstrip/rstrip
            ws = _WHITE_SPACE_CHARS
            for candidate in (matched.strip(ws), matched.lstrip(ws), matched.rstrip(ws)):
                tid = self._added.get(candidate)
                if tid is not None:
                    break
        if tid is None:
            raise TokenizerError(f"internal error: added token {matched!r} not found")
        return tid

    def _encode_text(self, text: str, out: list[int]) -> None:
        if self._normalizer is not None:
            text = unicodedata.normalize(self._normalizer, text)
        get = self._cache.get
        for piece in self._pre.split(text):
            ids = get(piece)
            if ids is None:
                ids = self._encode_piece(piece)
            out += ids

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        if not piece:  # a custom regex can match empty strings
            return ()
        word = _spell(piece)
        vocab = self._vocab
        tid = vocab.get(word)
        if tid is not None and (self._ignore_merges or len(word) == 1):
            ids: tuple[int, ...] = (tid,)
        else:
            symbols = self._bpe(word) if len(word) <= _HEAP_BPE_THRESHOLD else self._bpe_heap(word)
            result: list[int] = []
            for sym in symbols:
                tid = vocab.get(sym)
                if tid is not None:
                    result.append(tid)
                else:  # no such token (inconsistent merges): fall back to bytes, as llama.cpp does
                    result.extend(vocab[ch] for ch in sym if ch in vocab)
            ids = tuple(result)
        if self._cache_size and len(piece) <= _MAX_CACHED_PIECE:
            cache = self._cache
            if len(cache) >= self._cache_size:
                # Drop the oldest half (dicts keep insertion order): amortised O(1), and
                # unlike clearing everything it keeps the recent working set warm.
                for key in list(itertools.islice(cache, len(cache) // 2 + 1)):
                    cache.pop(key, None)
            cache[piece] = ids
        return ids

    def _bpe(self, word: str) -> list[str]:
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

    def _bpe_heap(self, word: str) -> list[str]:
        """Same merge order as `_bpe`, O(n log n) for long pieces (whitespace runs, blobs)."""
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
        self._cache.clear()

    # ---- decoding ------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int]) -> None:
        if len(ids) and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(int(i) for i in ids if not 0 <= i < self.vocab_size)
            raise TokenizerError(f"token id {bad} outside the vocabulary of {self.vocab_size}")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Token ids -> text. Bytes that do not form valid UTF-8 become U+FFFD."""
        self._check_ids(ids)
        table = self._token_bytes
        if skip_special_tokens:
            special = self.special_ids
            data = b"".join([table[i] for i in ids if i not in special])
        else:
            data = b"".join([table[i] for i in ids])
        return data.decode("utf-8", "replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (special tokens: their UTF-8 text)."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} outside the vocabulary of {self.vocab_size}")
        return self._token_bytes[token_id]

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry as stored (byte-level spelling for normal tokens)."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} outside the vocabulary of {self.vocab_size}")
        return self._tokens[token_id]

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (as stored) or of an added token's text."""
        tid = self._added.get(token)
        return tid if tid is not None else self._vocab.get(token)

    def token_type(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} outside the vocabulary of {self.vocab_size}")
        return self._types[token_id]

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, pre={self.pre_tokenizer_name!r}, "
                f"bos={self.bos_token!r}, eos={self.eos_token!r})")


class IncrementalDetokenizer:
    """Streams text as tokens arrive, holding back incomplete UTF-8 sequences.

    `"".join(add(t) for t in ids) + flush() == tokenizer.decode(ids)`: the stdlib UTF-8
    incremental decoder replaces exactly the bytes a one-shot decode would.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._table = tokenizer._token_bytes
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token_id: int) -> str:
        """Feed one token; returns the text it completes (possibly "")."""
        if not 0 <= token_id < self._tokenizer.vocab_size:
            raise TokenizerError(
                f"token id {token_id} outside the vocabulary of {self._tokenizer.vocab_size}"
            )
        if token_id in self._skip:
            return ""
        return self._decoder.decode(self._table[token_id])

    def flush(self) -> str:
        """Whatever is held back (incomplete bytes become U+FFFD); resets the stream."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished character are held back."""
        return bool(self._decoder.getstate()[0])


# --------------------------------------------------------------------------------------
# Loader helpers
# --------------------------------------------------------------------------------------

def _field_value(field: Any, key: str) -> Any:
    """A GGUF metadata value as plain Python (str, int, bool, float or a list of them)."""
    import gguf

    types = field.types
    if not types:
        return None
    parts, data = field.parts, field.data
    try:
        if types[0] == gguf.GGUFValueType.STRING:
            return str(parts[data[0]].tobytes(), "utf-8")
        if types[0] == gguf.GGUFValueType.ARRAY:
            if types[-1] == gguf.GGUFValueType.STRING:
                return [str(parts[i].tobytes(), "utf-8") for i in data]
            if types[-1] == gguf.GGUFValueType.ARRAY:
                raise TokenizerError(f"nested arrays in GGUF key {key} are not supported")
            if not len(data):
                return []
            import numpy as np

            return np.concatenate([parts[i] for i in data]).tolist()
        return parts[data[0]].tolist()[0]
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"GGUF key {key} holds a string that is not UTF-8: {exc}") from None


def _split_merges(merges: Iterable[str]) -> list[tuple[str, str]]:
    out = []
    for m in merges:
        # llama.cpp splits at the first space after position 0.
        pos = m.find(" ", 1)
        if pos < 0:
            raise TokenizerError(f"malformed BPE merge {m!r}")
        out.append((m[:pos], m[pos + 1:]))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    return value if isinstance(value, dict) else {}


def _hf_pattern(spec: dict[str, Any]) -> str:
    pattern = spec.get("pattern") or {}
    if "Regex" in pattern:
        return pattern["Regex"]
    if "String" in pattern:
        return re.escape(pattern["String"])
    raise TokenizerError(f"unsupported Split pattern {pattern!r}")


def _hf_pre_stages(spec: dict[str, Any] | None) -> tuple[list[str], bool]:
    """tokenizer.json pre_tokenizer -> (regex stages, whether ByteLevel is present)."""
    if spec is None:
        return [], False
    kind = spec.get("type")
    if kind == "Sequence":
        stages: list[str] = []
        byte_level = False
        for sub in spec.get("pretokenizers") or []:
            sub_stages, sub_byte_level = _hf_pre_stages(sub)
            stages += sub_stages
            byte_level |= sub_byte_level
        return stages, byte_level
    if kind == "ByteLevel":
        stages = [_PREFIX_SPACE] if spec.get("add_prefix_space") else []
        if spec.get("use_regex", True):
            stages.append(_GPT2)
        return stages, True
    if kind == "Split":
        behavior = str(spec.get("behavior", "Isolated")).lower()
        if behavior != "isolated" or spec.get("invert"):
            raise TokenizerError(
                f"unsupported Split behaviour {spec.get('behavior')!r} (invert={spec.get('invert')})"
            )
        return [_hf_pattern(spec)], False
    if kind == "Digits":
        return [r"\p{N}" if spec.get("individual_digits") else r"\p{N}+"], False
    raise TokenizerError(f"unsupported pre-tokenizer type {kind!r} in tokenizer.json")


_UnicodeForm = Literal["NFC", "NFD", "NFKC", "NFKD"]
_UNICODE_FORMS: dict[str, _UnicodeForm] = {"NFC": "NFC", "NFD": "NFD", "NFKC": "NFKC", "NFKD": "NFKD"}


def _hf_normalizer(spec: dict[str, Any] | None) -> _UnicodeForm | None:
    if spec is None:
        return None
    kind = spec.get("type")
    if kind in _UNICODE_FORMS:
        return _UNICODE_FORMS[kind]
    if kind == "Sequence" and not spec.get("normalizers"):
        return None
    if kind == "Sequence" and len(spec["normalizers"]) == 1:
        return _hf_normalizer(spec["normalizers"][0])
    raise TokenizerError(f"unsupported normalizer {kind!r} in tokenizer.json")


def _post_processor_adds(spec: dict[str, Any] | None, bos: int, tokens: Sequence[str]) -> bool:
    """Whether tokenizer.json's post-processor puts BOS first (Llama-3 style templates)."""
    if not spec:
        return False
    if spec.get("type") == "Sequence":
        return any(_post_processor_adds(p, bos, tokens) for p in spec.get("processors") or [])
    if spec.get("type") == "TemplateProcessing":
        single = spec.get("single") or []
        first = single[0] if single else {}
        special = first.get("SpecialToken") if isinstance(first, dict) else None
        return isinstance(special, dict) and special.get("id") == tokens[bos]
    return False
