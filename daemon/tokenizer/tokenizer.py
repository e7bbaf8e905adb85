"""Byte-level BPE tokenizer (GPT-2 family) in pure Python.

This module owns text <-> token-id conversion for the daemon:

* loading a vocabulary from GGUF metadata or from a Hugging Face folder
  (`loader`);
* encoding: added/special tokens are cut out of the raw text first (leftmost, longest
  first), the rest is pre-tokenized with the regexes llama.cpp picks for
  `tokenizer.ggml.pre` (`pretokenizer`, on `unicode_regex`), and every piece goes through
  rank-ordered BPE merges, behind a bounded piece -> ids cache (`bpe`);
* decoding, in one go or incrementally for streaming (never half a UTF-8 character).

Only the standard library, numpy and `gguf` are used at run time.
"""
from __future__ import annotations

import codecs
import logging
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..models.gguf_file import GGUFFile
from .bpe import DEFAULT_CACHE_SIZE, NOT_ALPHABET_RE, BytePairEncoder, spell, unspell
from .errors import TokenizerError
from .loader import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    UnicodeForm,
    gguf_tokenizer_args,
    hf_tokenizer_args,
)
from .pretokenizer import SUPPORTED_GGUF_PRE, PreTokenizer
from .unicode_regex import WHITE_SPACE, WHITE_SPACE_CHARS, class_body
from .unicode_regex import unicode_tables as _unicode  # noqa: F401  (benchmarks/tokenizer.py warms it)

# The constants were always importable from here; listing them keeps them exported for mypy.
__all__ = ["DEFAULT_CACHE_SIZE", "SUPPORTED_GGUF_PRE", "TOKEN_BYTE", "TOKEN_CONTROL", "TOKEN_NORMAL",
           "TOKEN_UNKNOWN", "TOKEN_UNUSED", "TOKEN_USER_DEFINED", "IncrementalDetokenizer", "Tokenizer",
           "TokenizerError"]

log = logging.getLogger(__name__)

# Token texts llama.cpp treats as end-of-generation whatever the metadata says.
_EOG_TEXTS = frozenset(
    {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>"}
)
_FIM_EOG_TEXTS = frozenset({"<|fim_pad|>", "<fim-pad>", "<PAD>", "<|fim_repo|>", "<|repo_name|>",
                            "<fim-repo>", "<REPO>", "<|file_sep|>"})


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
        normalizer: UnicodeForm | None = None,
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
        self._pre = PreTokenizer(pre_stages)
        self._normalizer = normalizer

        # BPE lookup is by byte-level spelling; control/user-defined tokens are stored as raw
        # text, and a normal token wins over them if both spell the same.
        vocab: dict[str, int] = {}
        for tid, (tok, ttype) in enumerate(zip(tokens, types)):
            if tok and ttype in (TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_BYTE):
                vocab.setdefault(tok if not NOT_ALPHABET_RE.search(tok) else spell(tok), tid)
        for tid, (tok, ttype) in enumerate(zip(tokens, types)):
            if tok and ttype not in (TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_BYTE):
                vocab.setdefault(spell(tok), tid)
        self._bpe = BytePairEncoder(vocab, merges, ignore_merges=ignore_merges, cache_size=cache_size)

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

    # ---- construction helpers ------------------------------------------------------

    @staticmethod
    def _bytes_of(token: str, ttype: int) -> bytes:
        if ttype in (TOKEN_NORMAL, TOKEN_UNUSED):
            return unspell(token)
        if ttype == TOKEN_BYTE:
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
            return bytes([int(m.group(1), 16)]) if m else unspell(token)
        return token.encode("utf-8")

    def _added_regex(self, added: dict[str, int]) -> re.Pattern[str] | None:
        if not added:
            return None
        ws = "[" + class_body(WHITE_SPACE, bmp_only=False) + "]*"
        alternatives = []
        for text in sorted(added, key=lambda t: (-len(t), t)):
            lstrip, rstrip = self._strip_around.get(added[text], (False, False))
            alternatives.append((ws if lstrip else "") + re.escape(text) + (ws if rstrip else ""))
        return re.compile("|".join(alternatives))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str], **kwargs: Any) -> Tokenizer:
        """Read the tokenizer from a GGUF file's metadata."""
        try:
            reader = GGUFFile(path)
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"cannot read GGUF file {os.fspath(path)!r}: {exc}") from exc
        return cls.from_gguf_reader(reader, **kwargs)

    @classmethod
    def from_gguf_reader(cls, reader: GGUFFile, **kwargs: Any) -> Tokenizer:
        """Build from an open `GGUFFile`, so the weight loader and the tokenizer share one parse."""
        return cls(**gguf_tokenizer_args(reader), **kwargs)

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str], **kwargs: Any) -> Tokenizer:
        """Build from a Hugging Face folder: tokenizer.json (+ tokenizer_config.json,
        generation_config.json, chat_template.jinja when present)."""
        return cls(**hf_tokenizer_args(Path(path)), **kwargs)

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
            ws = WHITE_SPACE_CHARS
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
        get = self._bpe.cache.get
        encode_piece = self._bpe.encode
        for piece in self._pre.split(text):
            ids = get(piece)
            if ids is None:
                ids = encode_piece(piece)
            out += ids

    def clear_cache(self) -> None:
        self._bpe.clear_cache()

    # ---- decoding ------------------------------------------------------------------

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} outside the vocabulary of {self.vocab_size}")

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
        self._check_id(token_id)
        return self._token_bytes[token_id]

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry as stored (byte-level spelling for normal tokens)."""
        self._check_id(token_id)
        return self._tokens[token_id]

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (as stored) or of an added token's text."""
        tid = self._added.get(token)
        return tid if tid is not None else self._bpe.vocab.get(token)

    def token_type(self, token_id: int) -> int:
        self._check_id(token_id)
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
