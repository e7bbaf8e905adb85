"""Text ↔ token ids, in pure Python: a byte-level BPE (`bpe`) behind model-specific
pre-tokenizers (`pretokenizer`, over Unicode classes in `unicode_regex`), loaded from GGUF
metadata or a Hugging Face `tokenizer.json` (`loader`), and the model's chat template rendered
in jinja2's sandbox (`chat_template`). No torch, no aiohttp: the engine and the server both use
it."""

from .errors import TokenizerError
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer", "TokenizerError"]
