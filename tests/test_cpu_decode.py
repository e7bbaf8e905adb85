"""The decode path of a few sequences (each layer one Numba call, numba_kernels.cpu_decode)
against the step-by-step forward it replaces, on the default model: same logits to float32 rounding, same
greedy text, and bad slots refused before anything is written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inflightd import LLM, SamplingParams
from inflightd.engine.sequence import SeqChunk

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(default_gguf: Path) -> LLM:
    return LLM(model=str(default_gguf), dtype="float32", kv_cache_memory=64 << 20)


def _logits(runner, chunks: SeqChunk | list[SeqChunk], fused: bool) -> torch.Tensor:  # noqa: ANN001
    saved = runner._caches_np
    if not fused:
        runner._caches_np = None
    try:
        return runner.execute(chunks if isinstance(chunks, list) else [chunks]).double()
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


def test_decode_of_several_sequences_matches_forward(llm: LLM) -> None:
    """Three sequences of different lengths in their own shuffled blocks decode one token each
    in one step; one of them is not sampled (a prefill's last chunk position)."""
    runner = llm.engine.runner
    bs = runner.kv.block_size
    rng = np.random.default_rng(11)
    vocab = llm.model.config.vocab_size
    seqs = []
    for sid, (n, table) in enumerate([(2 * bs + 5, [3, 8, 1]), (bs - 3, [6]), (7, [4])]):
        prompt = rng.integers(0, vocab, n).tolist()
        slots = [table[p // bs] * bs + p % bs for p in range(n + 1)]
        runner.execute([SeqChunk(sid, prompt, 0, slots[:n], table, True)])
        seqs.append((sid, n, table, slots))
    toks = rng.integers(0, vocab, len(seqs)).tolist()
    chunks = [SeqChunk(sid, [tok], n, [slots[n]], table, sid != 1) for (sid, n, table, slots), tok in zip(seqs, toks)]
    want = _logits(runner, chunks, fused=False)
    got = _logits(runner, chunks, fused=True)
    assert got.shape == want.shape == (2, vocab)
    assert float((got - want).norm() / want.norm()) <= 1e-5
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_greedy_text_is_the_same_on_both_paths(llm: LLM) -> None:
    msgs = [[{"role": "user", "content": "Explain why the sky is blue in two sentences."}],
            [{"role": "user", "content": "Name three rivers of Europe."}],
            [{"role": "user", "content": "Write a haiku about rain."}]]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    for batch in (msgs[:1], msgs):  # one sequence; three decoding together
        fused = [o.token_ids for o in llm.chat(batch, params)]
        runner = llm.engine.runner
        saved, runner._caches_np = runner._caches_np, None
        try:
            plain = [o.token_ids for o in llm.chat(batch, params)]
        finally:
            runner._caches_np = saved
        assert fused == plain and all(len(t) == 48 for t in fused)


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
