"""The default model on the paged KV cache and the Numba CPU kernels against the contiguous
reference runner (torch SDPA): identical greedy continuations with whole prompts, with chunked
prefill, and with a cache so small that sequences are preempted and recomputed; prefix reuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from inflightd import LLM, SamplingParams
from inflightd.engine.scheduler_config import RequestTooLongError, SchedulerConfig
from inflightd.runtime.paged_cache import PagedKVCache

pytestmark = pytest.mark.slow  # loads the default model

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
def reference_tokens(default_gguf: Path) -> list[list[int]]:
    ref = LLM(model=str(default_gguf), dtype="float32", attention="reference", kv_cache_memory=256 << 20)
    tokens = [o.token_ids for o in ref.generate(PROMPTS, GREEDY)]
    # a repeated prompt must not be offered prefix-cache hits the reference runner cannot serve
    assert ref.generate(PROMPTS[:1], GREEDY)[0].token_ids == tokens[0]
    ref.close()
    return tokens


def blocks_bytes(llm: LLM, n: int) -> int:
    return n * PagedKVCache.bytes_per_block(llm.model.config, 16, llm.model.dtype)


def test_paged_greedy_equals_reference(paged: LLM, reference_tokens: list[list[int]]) -> None:
    outs = paged.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference_tokens
    paged.block_manager.integrity_check()
    assert paged.block_manager.usage == 0.0


def test_chunked_prefill_equals_reference(default_gguf: Path, reference_tokens: list[list[int]]) -> None:
    # a 16-token budget splits every prompt over steps, mixed with the others' decodes
    llm = LLM(model=str(default_gguf), kv_cache_memory=64 << 20,
              scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8, max_queue_delay_ms=0))
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference_tokens
    assert llm.engine.stats.steps > 32  # one prefill step + 31 decode steps without chunking
    llm.close()


def test_prefix_hit_gives_same_tokens(paged: LLM) -> None:
    long_prompt = "Summarise the following text in one sentence. " * 8 + "The end."
    first = paged.generate([long_prompt], GREEDY)[0]
    again = paged.generate([long_prompt], GREEDY)[0]
    assert first.cached_tokens == 0
    assert again.cached_tokens > 0
    assert again.cached_tokens % paged.block_manager.block_size == 0
    assert again.token_ids == first.token_ids
    paged.block_manager.integrity_check()


def test_small_cache_preempts_and_recomputes(default_gguf: Path, reference_tokens: list[list[int]]) -> None:
    probe = LLM(model=str(default_gguf), attention="reference", kv_cache_memory=1 << 20)
    per_block = blocks_bytes(probe, 1)
    probe.close()
    # 12 blocks = 192 tokens for five sequences of up to ~55 tokens: they cannot all grow at once
    llm = LLM(model=str(default_gguf), kv_cache_memory=12 * per_block)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference_tokens
    assert llm.engine.scheduler.stats.num_preemptions > 0
    llm.block_manager.integrity_check()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    with pytest.raises(RequestTooLongError, match="KV cache"):
        llm.generate(["word " * 200], SamplingParams(max_tokens=8))
    llm.close()
