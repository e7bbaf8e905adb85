"""Turning logits into next tokens. One `Sampler` call samples a whole batch, vectorised over
its rows: per-row parameter tensors are built once per call, penalties and biases are sparse
index updates, and the top-k / top-p / min-p filters reduce to one logit threshold per row.

Batch invariance: a row's token depends only on its logits, its parameters and its own
generator, never on the other rows or on its position. Each sampled row draws exactly one
uniform from its own generator and is sampled by inverse CDF over its kept tokens in vocabulary
order; which code path serves a row (a small top-`window` slice or the full vocabulary) is
decided by that row alone. (This assumes per-row reductions give the same bits whatever the
batch shape, as torch's CPU kernels do in tests/test_sampling.py; a GPU kernel whose reduction
order followed the batch shape could move a draw that lands within a rounding error of a
boundary.)

Logprobs follow vLLM V1's default (`logprobs_mode="raw_logprobs"`): they describe the model's
raw distribution, before logit bias, penalties, temperature and filters, so they mean the same
thing whatever the request's sampling settings are."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams

# Width of the top-k slice that serves rows whose kept set is small (top-k ≤ window, or a nucleus
# that fits in it). A full sort of a 49152 vocabulary is ~30x slower than this topk on the CPU.
DEFAULT_WINDOW = 256
_GROWTH = 16  # a nucleus that outgrows its prefix is retried on one this many times as long


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    # The sampled token's raw logprob, for every row, when any row asked for logprobs.
    logprobs: list[float] | None = None
    # Per row, its `logprobs` most likely (token id, logprob) pairs, most likely first; empty for
    # rows that did not ask. None when no row asked.
    top_logprobs: list[list[tuple[int, float]]] | None = None


def make_generator(params: SamplingParams) -> torch.Generator:
    """A CPU generator for one request: seeded from `params.seed`, else from the OS."""
    g = torch.Generator()
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


class Sampler:
    """Samples one token per row. Holds only an OS-seeded generator for rows given None."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be ≥ 1 (got {window})")
        self.window = window
        self._unseeded = torch.Generator()
        self._unseeded.seed()

    def __call__(
        self,
        logits: torch.Tensor,  # [N, vocab] float32; not modified
        params: Sequence[SamplingParams],  # N
        generators: Sequence[torch.Generator | None],  # N CPU generators; None: an OS-seeded one
        prompt_token_ids: Sequence[Sequence[int]],  # N, for the repetition penalty
        output_token_ids: Sequence[Sequence[int]],  # N, for all penalties
    ) -> SampleResult:
        n, vocab = logits.shape
        if not len(params) == len(generators) == len(prompt_token_ids) == len(output_token_ids) == n:
            raise ValueError(
                f"{n} logit rows but {len(params)} params, {len(generators)} generators, "
                f"{len(prompt_token_ids)} prompts, {len(output_token_ids)} outputs"
            )
        raw = logits if logits.dtype == torch.float32 else logits.float()
        x = process_logits(raw, params, prompt_token_ids, output_token_ids)
        device = raw.device

        greedy = [i for i, p in enumerate(params) if p.greedy]
        rand = [i for i, p in enumerate(params) if not p.greedy]
        tokens = torch.empty(n, dtype=torch.long, device=device)
        if greedy:
            tokens[_index(greedy, device)] = _take(x, greedy).argmax(dim=-1)
        if rand:
            # One uniform per sampled row, from that row's own generator.
            u = torch.cat([torch.rand(1, generator=_or(generators[i], self._unseeded)) for i in rand])
            self._sample(x, params, rand, u.to(device), tokens)

        if all(p.logprobs is None for p in params):
            return SampleResult(tokens.tolist())
        return _with_logprobs(raw, tokens, params)

    def _sample(
        self,
        x: torch.Tensor,  # [N, vocab] processed logits (unscaled)
        params: Sequence[SamplingParams],  # N
        rows: list[int],  # S rows to sample, none greedy
        u: torch.Tensor,  # [S] their uniforms in [0, 1)
        tokens: torch.Tensor,  # [N] written at `rows`
    ) -> None:
        """Works on unscaled logits: temperature T > 0 keeps their order, so every filter is a
        threshold on x itself, and T only enters where probabilities are formed (on the slice, or
        in the full-row exp)."""
        n, vocab = x.shape
        device = x.device
        temp = torch.tensor([p.temperature for p in params], device=device)  # [N], 0 for greedy rows
        uu = torch.zeros(n, device=device)
        uu[_index(rows, device)] = u
        top = torch.zeros(n, device=device)  # each sampled row's largest logit
        thresh = torch.full((n,), float("-inf"), device=device)  # keep logits ≥ it
        width = min(self.window, vocab)
        filtered = [i for i in rows if _filtered(params[i], vocab)]
        full = [i for i in rows if not _filtered(params[i], vocab)]
        if filtered:
            f_t = _index(filtered, device)
            w_vals, w_idx = _take(x, filtered).topk(width, dim=-1)  # [F, width], descending
            top[f_t] = w_vals[:, 0]
            min_p = torch.tensor([params[i].min_p for i in filtered], device=device)
            f_thresh = w_vals[:, 0] + temp[f_t] * min_p.log()  # p ≥ min_p·p_max; -inf when 0
            kp = [j for j, i in enumerate(filtered) if 0 < params[i].top_k < vocab or params[i].top_p < 1]
            if kp:
                kp_t = _index(kp, device)
                kp_rows = [filtered[j] for j in kp]
                f_thresh[kp_t] = torch.maximum(
                    f_thresh[kp_t], _top_k_p_threshold(x, kp_rows, w_vals[kp_t], temp, params, vocab)
                )
            thresh[f_t] = f_thresh
            # The kept set fits in the slice when its last value is below the threshold (ties
            # beyond the slice are then impossible): those rows are sampled from the slice alone.
            fits = (w_vals[:, -1] < f_thresh).tolist() if width < vocab else [True] * len(filtered)
            inside = [j for j, ok in enumerate(fits) if ok]
            full += [i for i, ok in zip(filtered, fits) if not ok]
            if inside:
                in_t = _index(inside, device)
                r_t = f_t[in_t]
                # Vocabulary order inside the slice: the order the full path walks, so a draw
                # lands on the same token whichever path serves the row.
                idx, perm = w_idx[in_t].sort(dim=-1)
                vals = w_vals[in_t].gather(1, perm)
                pick = _inverse_cdf(vals, thresh[r_t], top[r_t], temp[r_t], uu[r_t])
                tokens[r_t] = idx.gather(1, pick[:, None]).squeeze(1)
        if full:
            full.sort()
            r_t = _index(full, device)
            xf = _take(x, full)
            unfiltered = [j for j, i in enumerate(full) if not _filtered(params[i], vocab)]
            if unfiltered:
                un_t = _index(unfiltered, device)
                top[r_t[un_t]] = _take(xf, unfiltered).max(dim=-1).values
            tokens[r_t] = _inverse_cdf(xf, thresh[r_t], top[r_t], temp[r_t], uu[r_t])


def process_logits(
    logits: torch.Tensor,  # [N, vocab] float32; not modified
    params: Sequence[SamplingParams],  # N
    prompt_token_ids: Sequence[Sequence[int]],  # N
    output_token_ids: Sequence[Sequence[int]],  # N
) -> torch.Tensor:  # [N, vocab]: logits itself when no row has a bias or a penalty
    """Logit bias, then the repetition penalty (prompt and output tokens), then the frequency and
    presence penalties (output tokens), each a sparse update of only the tokens concerned."""
    n, vocab = logits.shape
    biased = [i for i, p in enumerate(params) if p.logit_bias is not None]
    rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1]
    freq = [i for i, p in enumerate(params) if p.presence_penalty != 0 or p.frequency_penalty != 0]
    if not (biased or rep or freq):
        return logits
    device = logits.device
    x = logits.clone(memory_format=torch.contiguous_format)
    flat = x.view(-1)  # row i, token t at i * vocab + t
    if biased:
        for i in biased:
            params[i].check_vocab(vocab)
        pos = [i * vocab + t for i in biased for t, _ in params[i].logit_bias_pairs]
        bias = [b for i in biased for _, b in params[i].logit_bias_pairs]
        flat.index_add_(0, torch.tensor(pos, device=device), torch.tensor(bias, device=device))
    if rep:
        # Duplicates are harmless: each writes the same value, computed from the original logit.
        seen = _flat_ids([(i, ids) for i in rep for ids in (prompt_token_ids[i], output_token_ids[i])], vocab)
        penalty = _per_row(rep, [params[i].repetition_penalty for i in rep], n)[seen // vocab].to(device)
        seen = seen.to(device)
        v = flat[seen]
        flat[seen] = torch.where(v > 0, v / penalty, v * penalty)
    if freq:
        seen, counts = torch.unique(_flat_ids([(i, output_token_ids[i]) for i in freq], vocab), return_counts=True)
        rows = seen // vocab
        f = _per_row(freq, [params[i].frequency_penalty for i in freq], n)[rows]
        pr = _per_row(freq, [params[i].presence_penalty for i in freq], n)[rows]
        flat.index_add_(0, seen.to(device), (-(f * counts + pr)).to(device))
    return x


def _filtered(p: SamplingParams, vocab: int) -> bool:
    """Whether a row's kept set may be small: it has a top-k, top-p or min-p filter."""
    return 0 < p.top_k < vocab or p.top_p < 1 or p.min_p > 0


def _top_k_p_threshold(
    x: torch.Tensor,  # [N, vocab] unscaled logits
    rows: list[int],  # R rows with top-k or top-p
    w_vals: torch.Tensor,  # [R, width] their largest logits, descending
    temp: torch.Tensor,  # [N]
    params: Sequence[SamplingParams],  # N
    vocab: int,
) -> torch.Tensor:  # [R] keep logits ≥ it
    """Top-k keeps the k largest logits (and their ties); top-p then keeps the smallest prefix,
    by decreasing probability of the top-k-renormalised distribution, whose mass reaches top_p
    (the old per-row sampler's semantics). Read off the slice; the rows whose k or nucleus may
    reach past it are redone on a longer prefix (topk of their largest k, or a full sort)."""
    device = x.device
    rows_t = _index(rows, device)
    k = torch.tensor([params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in rows], device=device)
    top_p = torch.tensor([params[i].top_p for i in rows], device=device)
    t = temp[rows_t]
    # log of the scaled row's whole mass, needed by top-p rows without top-k (the others use
    # the mass of their top k)
    log_z = torch.zeros(len(rows), device=device)
    unlimited = [j for j, i in enumerate(rows) if not 0 < params[i].top_k < vocab and params[i].top_p < 1]
    if unlimited:
        un_t = _index(unlimited, device)
        log_z[un_t] = (_take(x, [rows[j] for j in unlimited]) / t[un_t, None]).logsumexp(-1)
    thresh, complete = _prefix_threshold(w_vals, k, top_p, t, log_z, vocab)
    # Redo the rows whose prefix was too short on a longer one: their k largest logits, or for a
    # nucleus without top-k, a prefix 16 times as long, then the sorted row. Grouped by length,
    # so a row's prefix never depends on the other rows.
    length = {j: w_vals.shape[1] for j, ok in enumerate(complete) if not ok}
    while length:
        by_len: dict[int, list[int]] = {}
        for j, m in length.items():
            kj = int(k[j])
            by_len.setdefault(kj if kj < vocab else min(vocab, m * _GROWTH), []).append(j)
        length = {}
        for m, js in sorted(by_len.items()):
            js_t = _index(js, device)
            longer = _take(x, [rows[j] for j in js]).topk(m, dim=-1).values
            thresh[js_t], done = _prefix_threshold(longer, k[js_t], top_p[js_t], t[js_t], log_z[js_t], vocab)
            length.update({j: m for j, ok in zip(js, done) if not ok and m < vocab})
    return thresh


def _prefix_threshold(
    vals: torch.Tensor,  # [R, M] the largest M unscaled logits of each row, descending
    k: torch.Tensor,  # [R] top-k (vocab when off)
    top_p: torch.Tensor,  # [R]
    temp: torch.Tensor,  # [R]
    log_z: torch.Tensor,  # [R] log of the whole scaled row's mass; used where k == vocab
    vocab: int,
) -> tuple[torch.Tensor, list[bool]]:  # [R] thresholds; whether each prefix was long enough
    m = vals.shape[1]
    scaled = vals / temp[:, None]
    in_k = torch.arange(m, device=vals.device)[None, :] < k[:, None]  # [R, M]
    limited = k < vocab
    log_z = torch.where(limited, scaled.masked_fill(~in_k, float("-inf")).logsumexp(-1), log_z)
    probs = (scaled - log_z[:, None]).exp().masked_fill(~in_k, 0.0)
    before = probs.cumsum(-1) - probs  # mass strictly above each position
    kept = ((before < top_p[:, None]) & in_k).sum(-1).clamp(min=1)  # ≥ 1: the first always stays
    kept = torch.where(top_p < 1, kept, k)  # top_p = 1 keeps all k, even past rounded-up mass
    thresh = vals.gather(1, (kept.clamp(max=m) - 1)[:, None]).squeeze(1)
    # Too short when the k-th value lies past the prefix (log_z then misses some of the top-k
    # mass), or, without top-k, when the nucleus fills the prefix and may go on.
    complete = torch.where(limited, k <= m, kept < m)
    return thresh, complete.tolist()


def _inverse_cdf(
    vals: torch.Tensor,  # [R, M] unscaled logits, in vocabulary order
    thresh: torch.Tensor,  # [R] keep values ≥ it
    top: torch.Tensor,  # [R] the row's largest value
    temp: torch.Tensor,  # [R] > 0
    u: torch.Tensor,  # [R] uniforms in [0, 1)
) -> torch.Tensor:  # [R] positions in 0..M-1, each of a kept value
    weight = ((vals - top[:, None]) / temp[:, None]).exp_().masked_fill_(vals < thresh[:, None], 0.0)
    cdf = weight.cumsum_(-1)
    # The first position whose cdf exceeds u·total: its weight is > 0, and it exists because
    # u < 1 makes u·total < total in round-to-nearest float. The clamp only guards NaN logits.
    pos = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    return pos.clamp(max=vals.shape[1] - 1)


def _or(g: torch.Generator | None, default: torch.Generator) -> torch.Generator:
    return default if g is None else g


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _take(
    x: torch.Tensor,  # [N, ...]
    rows: list[int],  # sorted, distinct
) -> torch.Tensor:  # [len(rows), ...]: a view when the rows are contiguous, else a copy
    if rows and rows[-1] - rows[0] == len(rows) - 1:
        return x[rows[0] : rows[-1] + 1]
    return x[_index(rows, x.device)]


def _flat_ids(
    rows: Sequence[tuple[int, Sequence[int]]],  # (row index, its token ids)
    vocab: int,
) -> torch.Tensor:  # [total ids] row * vocab + id, on the CPU
    if not rows:
        return torch.empty(0, dtype=torch.long)
    # as_tensor: lists convert in C; tensors and arrays kept by the caller are not copied
    t = torch.cat([torch.as_tensor(ids, dtype=torch.long).reshape(-1) for _, ids in rows])
    if t.numel() and not 0 <= int(t.min()) <= int(t.max()) < vocab:
        raise ValueError(f"token ids must be in [0, {vocab}) (got {int(t.min())}..{int(t.max())})")
    row = torch.tensor([i for i, _ in rows], dtype=torch.long)
    return row.repeat_interleave(torch.tensor([len(ids) for _, ids in rows])) * vocab + t


def _per_row(rows: Sequence[int], values: Sequence[float], n: int) -> torch.Tensor:  # [n] CPU
    out = torch.zeros(n)
    out[torch.tensor(rows, dtype=torch.long)] = torch.tensor(values)
    return out


def _with_logprobs(
    raw: torch.Tensor,  # [N, vocab] the model's logits
    tokens: torch.Tensor,  # [N]
    params: Sequence[SamplingParams],
) -> SampleResult:
    log_z = raw.logsumexp(-1)
    lp = (raw.gather(1, tokens[:, None]).squeeze(1) - log_z).tolist()
    asked = [i for i, p in enumerate(params) if p.logprobs]
    top: list[list[tuple[int, float]]] = [[] for _ in params]
    if asked:
        rows = torch.tensor(asked, device=raw.device)
        vals, idx = raw[rows].topk(min(raw.shape[1], max(params[i].logprobs or 0 for i in asked)), dim=-1)
        vals = vals - log_z[rows, None]
        for i, v, t in zip(asked, vals.tolist(), idx.tolist()):
            m = params[i].logprobs or 0
            top[i] = list(zip(t[:m], v[:m]))
    return SampleResult(tokens.tolist(), lp, top)
