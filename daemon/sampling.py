"""Turning logits into next tokens. One call samples a whole batch; every row uses its own
parameters and its own torch.Generator, so a seeded request draws the same numbers whatever
else shares its batch."""

from __future__ import annotations

import torch

from .sampling_params import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator:
    g = torch.Generator()
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    # logits: [N, vocab] float32 → N token ids
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k and p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1:
            sorted_p, idx = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
            probs = probs.scatter(0, idx[drop], 0.0)
        out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    return out
