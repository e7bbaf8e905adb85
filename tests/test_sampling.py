"""Tests of the sampler against straightforward per-row references: greedy is the argmax, the
sampled distribution matches the reference's kept set and renormalised probabilities
(chi-square over fixed seeds), penalties and logit bias match a per-row loop, logprobs are the
raw log_softmax, and a seeded row draws the same tokens whatever batch it sits in and wherever."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pytest
import torch

from inflightd.engine.sampling import Sampler, SampleResult, make_generator, process_logits
from inflightd.engine.sampling_params import SamplingParams, SamplingParamsError


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These tensors are small: a second OpenMP thread only adds hand-offs, which stall for whole
    # scheduler slices on a busy machine (see inflightd/runtime/settings.py).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# chi-square critical values at p = 0.001, by degrees of freedom
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88}


# ---------------------------------------------------------------- references


def ref_process(row: list[float], p: SamplingParams, prompt: Sequence[int], output: Sequence[int]) -> list[float]:
    out = list(row)
    for t, b in p.logit_bias_pairs:
        out[t] += b
    for t in set(prompt) | set(output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return out


def ref_probs(row: list[float], p: SamplingParams) -> dict[int, float]:
    """The distribution a non-greedy row samples from: token → probability (kept tokens only),
    in float64: temperature, top-k (ties kept), softmax, min-p relative to the max, top-p on the
    top-k-renormalised probabilities."""
    scaled = [v / p.temperature for v in row]
    keep = set(range(len(row)))
    if 0 < p.top_k < len(row):
        kth = sorted(scaled, reverse=True)[p.top_k - 1]
        keep = {t for t in keep if scaled[t] >= kth}
    top = max(scaled)
    z = sum(math.exp(scaled[t] - top) for t in keep)
    probs = {t: math.exp(scaled[t] - top) / z for t in keep}
    pmax = max(probs.values())
    allowed = {t for t in keep if probs[t] >= p.min_p * pmax}
    if p.top_p < 1:
        mass, nucleus = 0.0, set()
        for t in sorted(keep, key=lambda t: -probs[t]):
            if mass >= p.top_p:
                break
            nucleus.add(t)
            mass += probs[t]
        allowed &= nucleus
    total = sum(probs[t] for t in allowed)
    return {t: probs[t] / total for t in allowed}


def draw_many(
    row: torch.Tensor, p: SamplingParams, draws: int, sampler: Sampler, seed0: int = 0
) -> list[int]:  # row: [vocab]
    """`draws` tokens for one row: a batch of copies, each with its own seeded generator."""
    logits = row[None, :].expand(draws, -1).contiguous()
    gens: list[torch.Generator | None] = [torch.Generator().manual_seed(seed0 + i) for i in range(draws)]
    empty: list[list[int]] = [[] for _ in range(draws)]
    tokens: list[int] = sampler(logits, [p] * draws, gens, empty, empty).token_ids
    return tokens


def chi_square(tokens: list[int], probs: dict[int, float]) -> float:
    n = len(tokens)
    return sum((tokens.count(t) - n * q) ** 2 / (n * q) for t, q in probs.items())


# ---------------------------------------------------------------- greedy and distributions


def test_greedy_is_argmax() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 1000, generator=g) * 4
    greedy = SamplingParams(temperature=0)
    params = [greedy, SamplingParams(top_p=0.8), greedy, SamplingParams(top_k=3), greedy, greedy, SamplingParams()]
    gens = [make_generator(p) for p in params]
    empty: list[list[int]] = [[] for _ in params]
    out = Sampler()(logits, params, gens, empty, empty)
    want = logits.argmax(-1).tolist()
    assert [out.token_ids[i] for i in (0, 2, 4, 5)] == [want[i] for i in (0, 2, 4, 5)]
    assert out.logprobs is None and out.top_logprobs is None
    assert Sampler()(logits, [greedy] * 7, [None] * 7, empty, empty).token_ids == want


LOGITS6 = [2.0, 1.5, 0.9, 0.3, -0.4, -1.5]  # distinct probabilities, no ties


@pytest.mark.parametrize(
    "p",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.7),
        SamplingParams(temperature=0.8, top_k=3),
        SamplingParams(temperature=1.2, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.2),
        SamplingParams(temperature=0.9, top_k=4, top_p=0.9, min_p=0.1),
    ],
    ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}",
)
@pytest.mark.parametrize("window", [2, 256], ids=["slice2", "slice256"])
def test_distribution_matches_reference(p: SamplingParams, window: int) -> None:
    probs = ref_probs(LOGITS6, p)
    tokens = draw_many(torch.tensor(LOGITS6), p, 3000, Sampler(window=window))
    assert set(tokens) == set(probs)  # nothing outside the kept set, everything in it drawn
    assert chi_square(tokens, probs) < CHI2_CRIT[len(probs) - 1]


def test_unseeded_rows_use_an_os_seeded_generator() -> None:
    p = SamplingParams(temperature=1.0)
    logits = torch.tensor(LOGITS6)[None, :].expand(3000, -1).contiguous()
    empty: list[list[int]] = [[] for _ in range(3000)]
    tokens = Sampler()(logits, [p] * 3000, [None] * 3000, empty, empty).token_ids
    probs = ref_probs(LOGITS6, p)
    assert chi_square(tokens, probs) < CHI2_CRIT[5] * 2  # not seeded: a looser bound


# probabilities 0.40 0.30 0.15 0.10 0.05 (logits are their logs)
PROBS5 = [0.40, 0.30, 0.15, 0.10, 0.05]
LOGITS5 = [math.log(q) for q in PROBS5]


@pytest.mark.parametrize(
    ("p", "allowed"),
    [
        (SamplingParams(top_k=1), {0}),
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_k=4), {0, 1, 2, 3}),
        (SamplingParams(top_p=0.39), {0}),
        (SamplingParams(top_p=0.41), {0, 1}),
        (SamplingParams(top_p=0.69), {0, 1}),
        (SamplingParams(top_p=0.71), {0, 1, 2}),
        (SamplingParams(top_p=0.94), {0, 1, 2, 3}),
        (SamplingParams(top_p=0.96), {0, 1, 2, 3, 4}),
        (SamplingParams(min_p=0.26), {0, 1, 2}),  # threshold 0.104: 0.10 out
        (SamplingParams(min_p=0.24), {0, 1, 2, 3}),  # threshold 0.096: 0.10 in
        (SamplingParams(min_p=0.76), {0}),  # 0.30 < 0.304
        (SamplingParams(min_p=0.74), {0, 1}),
        # top-p on the top-k-renormalised distribution: top-2 is 0.571 / 0.429
        (SamplingParams(top_k=2, top_p=0.56), {0}),
        (SamplingParams(top_k=2, top_p=0.58), {0, 1}),
        (SamplingParams(top_k=3, top_p=0.95, min_p=0.3), {0, 1, 2}),
        (SamplingParams(top_k=4, top_p=0.95, min_p=0.4), {0, 1}),
    ],
)
@pytest.mark.parametrize("window", [2, 256], ids=["slice2", "slice256"])
def test_filters_keep_exactly_the_allowed_set(p: SamplingParams, allowed: set[int], window: int) -> None:
    assert set(ref_probs(LOGITS5, p)) == allowed  # the reference agrees with the hand count
    tokens = draw_many(torch.tensor(LOGITS5), p, 1000, Sampler(window=window))
    assert set(tokens) == allowed


@pytest.mark.parametrize("window", [8, 256], ids=["slice8", "slice256"])
def test_filters_on_a_large_vocabulary(window: int) -> None:
    # Flat and peaked rows, so nuclei both fit the slice and spill past it (a full sort), and a
    # top-k wider than the slice.
    g = torch.Generator().manual_seed(1)
    vocab = 3000
    rows = [torch.randn(vocab, generator=g) * s for s in (0.5, 3.0, 8.0)]
    cases = [
        SamplingParams(top_p=0.9),
        SamplingParams(top_p=0.5, temperature=0.7),
        SamplingParams(top_k=300),
        SamplingParams(top_k=40, top_p=0.7),
        SamplingParams(top_k=500, top_p=0.3),
        SamplingParams(min_p=0.05),
    ]
    sampler = Sampler(window=window)
    for row in rows:
        for p in cases:
            allowed = set(ref_probs(row.tolist(), p))
            tokens = draw_many(row, p, 300, sampler)
            assert set(tokens) <= allowed, p


# ---------------------------------------------------------------- penalties and bias


def random_case(
    seed: int, n: int, vocab: int
) -> tuple[torch.Tensor, list[SamplingParams], list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 3
    params, prompts, outputs = [], [], []
    for i in range(n):
        r = torch.rand(4, generator=g).tolist()
        bias = {int(t): float(b) for t, b in zip(torch.randint(0, vocab, (3,), generator=g), torch.randn(3) * 5)}
        params.append(
            SamplingParams(
                temperature=0.0 if i % 3 == 0 else 0.8,
                repetition_penalty=[1.0, 0.7, 1.3, 2.0][i % 4],
                presence_penalty=0.0 if i % 5 == 1 else round(r[1] * 4 - 2, 3),
                frequency_penalty=0.0 if i % 5 == 2 else round(r[2] * 4 - 2, 3),
                logit_bias=bias if i % 2 else None,
            )
        )
        prompts.append(torch.randint(0, vocab, (int(r[3] * 30),), generator=g).tolist())
        outputs.append(torch.randint(0, vocab // 4, (i * 3,), generator=g).tolist())  # repeats
    return logits, params, prompts, outputs


@pytest.mark.parametrize("seed", range(5))
def test_penalties_and_bias_match_a_per_row_reference(seed: int) -> None:
    logits, params, prompts, outputs = random_case(seed, 9, 200)
    before = logits.clone()
    got = process_logits(logits, params, prompts, outputs)
    want = torch.tensor([ref_process(logits[i].tolist(), params[i], prompts[i], outputs[i]) for i in range(9)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits, before)  # the caller's logits are left alone
    # greedy rows pick the argmax of the processed logits
    out = Sampler()(logits, params, [make_generator(p) for p in params], prompts, outputs)
    for i, p in enumerate(params):
        if p.greedy:
            assert out.token_ids[i] == int(want[i].argmax())


def test_no_processing_returns_the_logits_untouched() -> None:
    logits = torch.randn(2, 10)
    assert process_logits(logits, [SamplingParams()] * 2, [[1, 2]] * 2, [[3]] * 2) is logits


def test_logit_bias_forces_and_bans() -> None:
    logits = torch.zeros(2, 50)
    logits[:, 7] = 5.0
    params = [SamplingParams(temperature=0, logit_bias={7: -100, 3: 1.0}), SamplingParams(logit_bias={"42": 100})]
    out = Sampler()(logits, params, [None, None], [[], []], [[], []])
    assert out.token_ids == [3, 42]


def test_logit_bias_outside_the_vocabulary_is_refused() -> None:
    p = SamplingParams(logit_bias={60: 1.0})
    p.check_vocab(61)
    with pytest.raises(SamplingParamsError, match="^logit_bias: token id 60"):
        p.check_vocab(60)
    with pytest.raises(SamplingParamsError, match="^logit_bias"):
        Sampler()(torch.zeros(1, 60), [p], [None], [[]], [[]])


def test_out_of_range_history_ids_are_refused() -> None:
    p = SamplingParams(repetition_penalty=1.2)
    with pytest.raises(ValueError, match="token ids"):
        Sampler()(torch.zeros(2, 10), [p, p], [None, None], [[1], [10]], [[], []])


# ---------------------------------------------------------------- batch invariance


SEEDED = [
    SamplingParams(seed=11, temperature=1.0),
    SamplingParams(seed=12, temperature=0.7, top_p=0.9),
    SamplingParams(seed=13, top_k=40),
    SamplingParams(seed=14, top_k=400, top_p=0.95),  # top-k wider than the slice
    SamplingParams(seed=15, min_p=0.02, temperature=1.3),
    SamplingParams(seed=16, top_p=0.8, repetition_penalty=1.3, frequency_penalty=0.5, logit_bias={5: 3.0}),
    SamplingParams(seed=17, temperature=2.0, top_p=0.999),  # the nucleus spills past the slice
]
FILLERS = [
    SamplingParams(temperature=0),
    SamplingParams(top_p=0.5, logprobs=5),
    SamplingParams(top_k=2, min_p=0.3),
    SamplingParams(temperature=0.5, presence_penalty=-1.0),
    SamplingParams(top_k=1000),
    SamplingParams(top_p=0.97, temperature=1.5),
]


def run_seeded(target: SamplingParams, batch: int, position: int, filler_seed: int, steps: int = 6) -> list[int]:
    """Decode `steps` tokens for `target` in a batch of `batch` rows at `position`; the target's
    logits are the same every run, the fillers' change with `filler_seed`."""
    vocab = 2000
    gt = torch.Generator().manual_seed(99)
    gf = torch.Generator().manual_seed(filler_seed)
    sampler = Sampler()
    gen = make_generator(target)
    fillers = [FILLERS[(filler_seed + j) % len(FILLERS)] for j in range(batch - 1)]
    params = fillers[:position] + [target] + fillers[position:]
    prompt = list(range(0, 60, 3))
    out: list[int] = []
    for _ in range(steps):
        logits = torch.randn(batch, vocab, generator=gf) * 4
        logits[position] = torch.randn(vocab, generator=gt) * 4
        gens = [gen if i == position else make_generator(p) for i, p in enumerate(params)]
        prompts = [prompt if i == position else [1, 2, 3] for i in range(batch)]
        outputs = [out if i == position else [4, 4, 9] for i in range(batch)]
        res = sampler(logits, params, gens, prompts, outputs)
        out = [*out, res.token_ids[position]]
    return out


@pytest.mark.parametrize("target", SEEDED, ids=lambda p: f"seed{p.seed}")
def test_seeded_rows_are_batch_invariant(target: SamplingParams) -> None:
    alone = run_seeded(target, 1, 0, 0)
    for batch, position, filler_seed in [(2, 1, 1), (5, 0, 2), (9, 4, 3), (32, 31, 4), (32, 17, 5)]:
        assert run_seeded(target, batch, position, filler_seed) == alone, (batch, position)
    assert run_seeded(target, 1, 0, 0) == alone  # and simply reproducible
    # a different seed gives different tokens (6 draws over a wide distribution)
    other = SamplingParams(**{**target.__dict__, "seed": (target.seed or 0) + 100})
    assert run_seeded(other, 3, 1, 0) != alone


def test_two_rows_with_one_seed_draw_alike() -> None:
    g = torch.Generator().manual_seed(3)
    row = torch.randn(500, generator=g) * 3
    logits = torch.stack([row, torch.randn(500, generator=g), row])
    p = SamplingParams(seed=5, top_p=0.95)
    params = [p, SamplingParams(), p]
    out = Sampler()(logits, params, [make_generator(q) for q in params], [[]] * 3, [[]] * 3)
    assert out.token_ids[0] == out.token_ids[2]


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_the_raw_log_softmax() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 300, generator=g) * 3
    params = [
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(temperature=0.5, top_k=5, logprobs=20, repetition_penalty=1.5),
        SamplingParams(top_p=0.9),  # did not ask
        SamplingParams(logprobs=0, logit_bias={0: 50.0}),  # its own logprob only
    ]
    out = Sampler()(logits, params, [make_generator(p) for p in params], [[1, 2]] * 4, [[3]] * 4)
    assert isinstance(out, SampleResult) and out.logprobs is not None and out.top_logprobs is not None
    ref = torch.log_softmax(logits.double(), -1)
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(float(ref[i, tok]), abs=1e-5)
    assert out.token_ids[3] == 0  # the bias drives sampling, not the reported logprob
    assert [len(t) for t in out.top_logprobs] == [3, 20, 0, 0]
    for i in (0, 1):
        top = out.top_logprobs[i]
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        want = ref[i].topk(len(top))
        assert [t for t, _ in top] == want.indices.tolist()
        assert values == pytest.approx(want.values.tolist(), abs=1e-5)


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", True),
        ("min_p", 1.5),
        ("seed", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("inf")),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("logprobs", 21),
        ("logprobs", -1),
        ("logit_bias", {1: 101.0}),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {"x": 1.0}),
        ("logit_bias", ((1, 1.0), (1, 2.0))),
        ("logit_bias", 3),
        ("stop_token_ids", (-1,)),
    ],
)
def test_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(SamplingParamsError, match=f"^{field}: "):
        SamplingParams(**{field: value})


def test_params_are_hashable_and_normalised() -> None:
    a = SamplingParams(logit_bias={5: 1, 2: -3.5}, stop="x", logprobs=2)
    b = SamplingParams(logit_bias=((2, -3.5), (5, 1.0)), stop=("x",), logprobs=2)
    assert a == b and hash(a) == hash(b)
    assert a.logit_bias == ((2, -3.5), (5, 1.0)) and a.logit_bias_pairs == a.logit_bias
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert not SamplingParams().penalised and SamplingParams(repetition_penalty=1.1).penalised


@pytest.mark.parametrize("p", SEEDED, ids=lambda p: f"seed{p.seed}")
def test_tokens_do_not_depend_on_the_slice_width(p: SamplingParams) -> None:
    # The slice and the full vocabulary walk kept tokens in the same (vocabulary) order, so a
    # draw lands on the same token whichever path serves the row.
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(64, 2000, generator=g) * torch.linspace(0.3, 8, 64)[:, None]
    hist: list[list[int]] = [[5, 6, 7]] * 64
    runs = [
        Sampler(window=w)(logits, [p] * 64, [torch.Generator().manual_seed(i) for i in range(64)], hist, hist)
        for w in (1, 16, 256, 2000)
    ]
    assert all(r.token_ids == runs[0].token_ids for r in runs)
