"""The one-token decode path (each layer one Numba call, numba_kernels.cpu_decode) against the
step-by-step forward it replaces, on the default model: same logits to float32 rounding, same
greedy text, and bad slots refused before anything is written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inflightd import LLM, SamplingParams
from inflightd.sequence import SeqChunk

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(default_gguf: Path) -> LLM:
    return LLM(model=str(default_gguf), dtype="float32", kv_cache_memory=64 << 20)


def _logits(runner, chunk: SeqChunk, fused: bool) -> torch.Tensor:  # noqa: ANN001
    saved = runner._caches_np
    if not fused:
        runner._caches_np = None
    try:
        return runner.execute([chunk]).double()
    finally:
        runner._caches_np = saved


def test_decode_token_matches_forward(llm: LLM) -> None:
    runner = llm.engine.runner
    assert runner._caches_np is not None  # the default model has block codes for every linear
    bs = runner.kv.block_size
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, llm.model.config.vocab_size, 2 * bs + 5).tolist()
    table = [7, 2, 5, 9]  # shuffled physical blocks
    slots = [table[p // bs] * bs + p % bs for p in range(len(prompt) + 3)]
    runner.execute([SeqChunk(0, prompt, 0, slots[: len(prompt)], table, True)])
    for i, tok in enumerate(rng.integers(0, llm.model.config.vocab_size, 3).tolist()):
        pos = len(prompt) + i
        chunk = SeqChunk(0, [tok], pos, [slots[pos]], table, True)
        want = _logits(runner, chunk, fused=False)
        got = _logits(runner, chunk, fused=True)  # rewrites the same slot with its own K/V
        assert got.shape == want.shape == (1, llm.model.config.vocab_size)
        assert float((got - want).norm() / want.norm()) <= 1e-5
        assert int(got.argmax()) == int(want.argmax())


def test_greedy_text_is_the_same_on_both_paths(llm: LLM) -> None:
    msgs = [[{"role": "user", "content": "Explain why the sky is blue in two sentences."}]]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    fused = llm.chat(msgs, params)[0].token_ids
    runner = llm.engine.runner
    saved, runner._caches_np = runner._caches_np, None
    try:
        plain = llm.chat(msgs, params)[0].token_ids
    finally:
        runner._caches_np = saved
    assert fused == plain and len(fused) == 48


def test_a_slot_outside_the_cache_is_refused_and_nothing_written(llm: LLM) -> None:
    runner = llm.engine.runner
    kc = runner._caches_np[0][0]
    before = kc.copy()
    capacity = runner.kv.num_blocks * runner.kv.block_size
    with pytest.raises(ValueError, match="outside the cache"):
        runner.execute([SeqChunk(0, [1], 0, [capacity], [0], True)])
    assert np.array_equal(kc, before, equal_nan=True)
    # and the model still decodes afterwards
    out = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
