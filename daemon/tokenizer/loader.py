"""Tokenizer loaders: what GGUF metadata or a Hugging Face folder says, as `Tokenizer` arguments.

GGUF is read the way llama.cpp's `llama-vocab.cpp` reads `tokenizer.ggml.*`; a Hugging Face
folder is `tokenizer.json` plus, when present, `tokenizer_config.json`,
`generation_config.json` and `chat_template.jinja`. Each loader returns the keyword
arguments of `Tokenizer.__init__`, so this module never needs the tokenizer itself.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from ..models.gguf_file import GGUFFile
from .errors import TokenizerError
from .pretokenizer import GGUF_PRE, GPT2, PREFIX_SPACE, SUPPORTED_GGUF_PRE

__all__ = ["TOKEN_BYTE", "TOKEN_CONTROL", "TOKEN_NORMAL", "TOKEN_UNKNOWN", "TOKEN_UNUSED",
           "TOKEN_USER_DEFINED", "UnicodeForm", "gguf_tokenizer_args", "hf_tokenizer_args"]

log = logging.getLogger(__name__)

# llama.cpp token types (tokenizer.ggml.token_type).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

UnicodeForm = Literal["NFC", "NFD", "NFKC", "NFKD"]  # a tokenizer.json normalizer we support


def gguf_tokenizer_args(gguf: GGUFFile) -> dict[str, Any]:
    """`Tokenizer` keyword arguments from an open GGUF file's (already decoded) metadata."""
    get = gguf.metadata.get

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
    if pre not in GGUF_PRE:
        raise TokenizerError(
            f"unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
            + ", ".join(SUPPORTED_GGUF_PRE)
        )
    stages, ignore_merges, add_bos_default = GGUF_PRE[pre]
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
    return dict(
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
    )


def hf_tokenizer_args(folder: Path) -> dict[str, Any]:
    """`Tokenizer` keyword arguments from a Hugging Face folder."""
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
    return dict(
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
    )


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
    regex, string = pattern.get("Regex"), pattern.get("String")
    if isinstance(regex, str):
        return regex
    if isinstance(string, str):
        return re.escape(string)
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
        stages = [PREFIX_SPACE] if spec.get("add_prefix_space") else []
        if spec.get("use_regex", True):
            stages.append(GPT2)
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


_UNICODE_FORMS: dict[str, UnicodeForm] = {"NFC": "NFC", "NFD": "NFD", "NFKC": "NFKC", "NFKD": "NFKD"}


def _hf_normalizer(spec: dict[str, Any] | None) -> UnicodeForm | None:
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
