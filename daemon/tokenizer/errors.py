"""The tokenizer's one error type.

It lives apart from `tokenizer.py` so that the modules the tokenizer is built from (regex
translation, pre-tokenizers, loaders) can raise it without importing the tokenizer.
"""
from __future__ import annotations

__all__ = ["TokenizerError"]


class TokenizerError(ValueError):
    """The tokenizer cannot be built from what it was given, or was misused (bad token id)."""
