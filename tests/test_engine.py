"""The in-flight engine with the default model (float32): batch invariance (with and without
preemption), seeded sampling across batch compositions, stop strings across token boundaries,
and vLLM's abort pattern."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from inflightd import LLM, SamplingParams
from inflightd.engine.outputs import EngineOutput
from inflightd.runtime.paged_cache import PagedKVCache

pytestmark = pytest.mark.slow  # loads the default model

TOPICS = ["the moon", "a red bicycle", "prime numbers", "the ocean", "Python decorators", "coffee",
          "a lighthouse", "winter", "chess openings", "volcanoes", "the printing press", "bees",
          "jazz music", "black holes", "bread baking", "the Roman empire"]
PROMPTS = [f"Write one sentence about {t}." for t in TOPICS]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(default_gguf: Path) -> LLM:
    return LLM(model=str(default_gguf), dtype="float32", kv_cache_memory=128 << 20)


@pytest.fixture(scope="module")
def alone(llm: LLM) -> list[list[int]]:
    """Each prompt run on its own."""
    return [llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS]


def test_batch_invariance(llm: LLM, alone: list[list[int]]) -> None:
    together = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in together] == alone


def test_batch_invariance_under_preemption(default_gguf: Path, llm: LLM, alone: list[list[int]]) -> None:
    per_block = PagedKVCache.bytes_per_block(llm.model.config, 16, llm.model.dtype)
    small = LLM(model=str(default_gguf), dtype="float32", kv_cache_memory=20 * per_block)
    together = small.generate(PROMPTS, GREEDY)
    assert small.engine.scheduler.stats.num_preemptions > 0
    assert [o.token_ids for o in together] == alone
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks
    small.close()


def test_seeded_sampling_is_independent_of_the_batch(llm: LLM) -> None:
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    alone = llm.generate([PROMPTS[3]], seeded)[0].token_ids
    mixed = llm.generate(PROMPTS[:6], [GREEDY, GREEDY, SamplingParams(max_tokens=5, temperature=1.0),
                                        seeded, GREEDY, SamplingParams(max_tokens=20, temperature=0.5)])
    assert mixed[3].token_ids == alone
    again = llm.generate([PROMPTS[3]] * 3, seeded)
    assert all(o.token_ids == alone for o in again)


def test_stop_string_across_tokens(llm: LLM) -> None:
    free = llm.generate([PROMPTS[0]], GREEDY)[0]
    text = free.text
    # a stop string that starts inside one token and ends inside a later one
    pieces = [llm.tokenizer.decode(free.token_ids[: i + 1]) for i in range(len(free.token_ids))]
    k = next(i for i in range(2, len(pieces)) if len(pieces[i - 1]) - len(pieces[i - 2]) >= 2)
    stop = text[len(pieces[k - 2]) - 1 : len(pieces[k - 1]) + 1]
    assert stop and stop in text
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]
    assert stop not in out.text


def test_abort_every_tenth_of_100(llm: LLM) -> None:
    """vLLM's pattern: 100 concurrent requests, every 10th aborted midway; the others complete
    exactly, nothing stays unfinished, every KV block is free afterwards."""
    engine = llm.engine
    prompts = [f"Count from {i} upwards:" for i in range(100)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = {i: o.token_ids for i, o in enumerate(llm.generate(prompts, params)) if i % 10}
    results: dict[int, list[EngineOutput]] = {i: [] for i in range(100)}
    done = threading.Semaphore(0)

    def sink_for(i: int):  # noqa: ANN202
        def sink(o: EngineOutput) -> None:
            results[i].append(o)
            if i % 10 == 0 and len(results[i]) == 3 and not o.finished:
                engine.abort(f"abort-{i}")  # midway, from the engine's own thread
            if o.finished:
                done.release()

        return sink

    for i, p in enumerate(prompts):
        engine.add_request(f"abort-{i}", llm.tokenizer.encode(p), params, sink_for(i))
    for _ in range(100):
        assert done.acquire(timeout=300)
    for i in range(100):
        outs = results[i]
        assert sum(o.finished for o in outs) == 1 and outs[-1].finished  # exactly one terminal output
        tokens = [t for o in outs for t in o.token_ids]
        if i % 10 == 0:
            assert outs[-1].finish_reason == "abort"
            assert len(tokens) < 12
        else:
            assert outs[-1].finish_reason == "length"
            assert tokens == expected[i]
    assert engine.num_unfinished == 0
    assert not engine.scheduler.has_unfinished()
    llm.block_manager.integrity_check()
    assert llm.block_manager.usage == 0.0
