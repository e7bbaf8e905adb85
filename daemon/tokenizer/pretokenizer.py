"""Pre-tokenizers: the per-model regexes that cut text into pieces before BPE.

The regexes are those llama.cpp picks for `tokenizer.ggml.pre` (llama-vocab.cpp), in its
own spelling; `unicode_regex` translates them for the stdlib `re` engine.
"""
from __future__ import annotations

from collections.abc import Sequence

from .unicode_regex import ASTRAL_RUN_RE, Regex, unicode_tables

__all__ = ["DEFAULT", "GGUF_PRE", "GPT2", "PREFIX_SPACE", "SUPPORTED_GGUF_PRE", "PreTokenizer"]

# The regexes llama.cpp's llm_tokenizer_bpe uses, in its own spelling.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's smollm/starcoder: every \p{N} on its own, then GPT-2 on the stretches between.
# Fused into one regex: a digit acts as the end of a stretch, so `\s+(?!\S)` may stop before
# one, and ` ?\p{N}+` can never match.
_DIGITS_THEN_GPT2 = (r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+"
                     r"|\s+(?![^\s\p{N}])|\s+")
DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> (regex stages, ignore_merges, add_bos default), from llama-vocab.cpp.
GGUF_PRE: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    name: (stages, ignore_merges, add_bos)
    for names, stages, ignore_merges, add_bos in (
        (("default",), DEFAULT, False, False),
        (("gpt-2", "phi-2", "roberta-bpe", "jina-es", "jina-de", "gigachat", "jina-v1-en",
          "jina-v2-es", "jina-v2-de", "jina-v2-code", "mpt", "olmo", "jais"), (GPT2,), False, False),
        (("llama3", "llama-v3", "llama-bpe", "falcon3"), (_LLAMA3,), True, True),
        (("dbrx", "smaug-bpe", "chatglm-bpe"), (_LLAMA3,), False, False),
        (("qwen2", "stablelm2", "megrez", "deepseek-r1-qwen"), (_QWEN2,), False, False),
        (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
         (r"\p{N}", GPT2), False, False),
    )
    for name in names
}
SUPPORTED_GGUF_PRE = tuple(sorted(GGUF_PRE))

# Stage lists that have an equivalent single regex covering every character.
_FUSED_STAGES = {(r"\p{N}", GPT2): _DIGITS_THEN_GPT2}

PREFIX_SPACE = "prefix-space"  # ByteLevel(add_prefix_space=True) as a stage


class PreTokenizer:
    """Cuts text into pieces for BPE.

    Each regex stage re-splits every piece the way Hugging Face's `Split(behavior="isolated")`
    and llama.cpp's `unicode_regex_split` do: matches and the stretches between them are
    both pieces. A lone regex that covers all the text runs as one `findall`, in C.
    """

    def __init__(self, stages: Sequence[str]) -> None:
        stages = tuple(stages)
        stages = (_FUSED_STAGES[stages],) if stages in _FUSED_STAGES else stages
        self.stages: list[Regex | None] = [
            None if s == PREFIX_SPACE else Regex(s) for s in stages
        ]
        regexes = [s for s in self.stages if s is not None]
        self._fold = all(r.fold for r in regexes)
        single = self.stages[0] if len(self.stages) == 1 else None
        self._findall = single.compiled.findall if single and single.compiled.groups == 0 else None
        self._tables = unicode_tables()

    def split(self, text: str) -> list[str]:
        if not text:
            return []
        folded = text
        if self._fold and not text.isascii() and ASTRAL_RUN_RE.search(text):
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
    """Pieces of the folded text -> the same spans of the original (folding keeps lengths)."""
    out = []
    pos = 0
    for piece in pieces:
        end = pos + len(piece)
        out.append(text[pos:end])
        pos = end
    return out
