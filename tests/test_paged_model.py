"""The default model on the paged KV cache and the Numba CPU kernels against the contiguous
reference path: identical greedy continuations (whole prompts, chunked prefill, a cache so small
that admission must wait), and prefix reuse."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from inflightd import LLM, SamplingParams
from inflightd.kv_cache import BlockManager
from inflightd.kv_storage import PagedKVCache
from inflightd.model_runner import ModelRunner
from inflightd.offline_backends import PagedBackend, ReferenceBackend

PROMPTS = [
    "The capital of France is",
    "def quicksort(xs):\n    ",
    "Write a haiku about the sea.",
    "List three prime numbers greater than 100:",
    "Translate to German: The weather is nice today, and we are going for a walk in the park.",
]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def paged(default_gguf: Path) -> LLM:
    return LLM(model=str(default_gguf), dtype="float32", kv_cache_memory=256 << 20)


@pytest.fixture(scope="module")
def reference_tokens(paged: LLM) -> list[list[int]]:
    ref = copy.copy(paged)  # same weights and tokenizer, contiguous reference cache
    ref._backend = ReferenceBackend(paged.model)
    return [o.token_ids for o in ref.generate(PROMPTS, GREEDY)]


def test_paged_greedy_equals_reference(paged: LLM, reference_tokens: list[list[int]]) -> None:
    outs = paged.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference_tokens
    paged.block_manager.integrity_check()
    assert paged.block_manager.usage == 0.0


def test_chunked_prefill_equals_reference(paged: LLM, reference_tokens: list[list[int]]) -> None:
    chunked = copy.copy(paged)
    chunked.max_num_batched_tokens = 7  # every prompt is split over several steps, mixed with decodes
    outs = chunked.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference_tokens


def test_prefix_hit_gives_same_tokens(paged: LLM) -> None:
    long_prompt = "Summarise the following text in one sentence. " * 8 + "The end."
    first = paged.generate([long_prompt], GREEDY)[0]
    again = paged.generate([long_prompt], GREEDY)[0]
    assert again.cached_tokens > 0
    assert again.cached_tokens % paged.block_manager.block_size == 0
    assert again.token_ids == first.token_ids
    paged.block_manager.integrity_check()


def with_cache(llm: LLM, num_blocks: int, block_size: int = 16) -> tuple[LLM, BlockManager]:
    """A copy of `llm` on a KV cache of its own with `num_blocks` blocks."""
    kv = PagedKVCache(llm.model.config, num_blocks, block_size, llm.model.dtype, llm.model.device)
    blocks = BlockManager(num_blocks, block_size)
    other = copy.copy(llm)
    other._backend = PagedBackend(ModelRunner(llm.model, kv), blocks)
    return other, blocks


def test_small_cache_waits_for_room(paged: LLM, reference_tokens: list[list[int]]) -> None:
    # room for about two sequences at a time: the others are admitted as blocks free up
    small, blocks = with_cache(paged, 12)
    outs = small.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference_tokens
    blocks.integrity_check()
    assert blocks.num_free_blocks == 12


def test_prompt_beyond_the_cache_is_refused(paged: LLM) -> None:
    tiny, _ = with_cache(paged, 2)
    with pytest.raises(ValueError, match="KV blocks"):
        tiny.generate(["word " * 40], SamplingParams(max_tokens=8))
