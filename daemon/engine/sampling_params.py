"""What a request asks of the sampler and when it stops. Validated on construction: a bad value
raises `SamplingParamsError` naming the field, so every front end reports the same message.
Hashable: `stop`, `stop_token_ids` and `logit_bias` are stored as tuples."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..checks import is_finite_number, is_int

MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: ±100 bans or forces a token
# Below this a temperature means greedy (vLLM's _SAMPLING_EPS): dividing float32 logits by
# 1e-308 gives inf, and the sampler then draws the same arbitrary token forever. Above
# MAX_TEMPERATURE every kept token is already about equally likely; larger values only overflow.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0
# The repetition penalty divides or multiplies logits: outside this range it overflows float32
# or erases every logit, and no model is tuned anywhere near it.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
# What torch.Generator.manual_seed takes: a signed or an unsigned 64-bit integer.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; the message names it."""


LogitBias = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 512
    temperature: float = 1.0  # 0 = greedy; below MIN_TEMPERATURE it becomes 0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None  # same seed, same output, whatever else is in the batch
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # HF/vLLM: logits of tokens seen in the prompt or the output are divided by it when positive,
    # multiplied when negative. 1 = off.
    repetition_penalty: float = 1.0
    # OpenAI: subtracted once from every token already in the output (presence), and once per
    # occurrence (frequency). The prompt does not count. 0 = off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Return the sampled token's logprob and the `logprobs` most likely tokens (0 = the sampled
    # token's only), from the model's raw distribution. None = off.
    logprobs: int | None = None
    # Token id → value added to its logit before anything else. A mapping is accepted and stored
    # as (id, value) pairs sorted by id; empty becomes None. Ids are checked against the vocabulary
    # by `check_vocab` (the sampler calls it; a front end that knows the vocabulary calls it early).
    logit_bias: Mapping[int, float] | LogitBias | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> SamplingParamsError:
            return SamplingParamsError(f"{name}: {why} (got {getattr(self, name)!r})")

        if isinstance(self.stop, str):  # a lone string is one stop sequence, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer ≥ 1")
        if not is_finite_number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise bad("temperature", f"must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy)")
        if self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)
        if not is_finite_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer ≥ 0 (0 disables it)")
        if not is_finite_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and (not is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise bad("seed", "must be an integer in [-2^63, 2^64)")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        if not is_finite_number(self.repetition_penalty) or not (
            MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY
        ):
            raise bad("repetition_penalty",
                      f"must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_finite_number(value) or not -2 <= value <= 2:
                raise bad(name, "must be in [-2, 2]")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias, bad))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logit_bias_pairs(self) -> LogitBias:
        """(token id, bias) pairs sorted by id; empty when there is no bias."""
        assert self.logit_bias is None or isinstance(self.logit_bias, tuple)  # normalised in __post_init__
        return self.logit_bias or ()

    @property
    def penalised(self) -> bool:
        """Whether sampling needs the prompt and output token ids."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def check_vocab(self, vocab_size: int) -> None:
        """Raise `SamplingParamsError` naming the field if a token id in logit_bias or
        stop_token_ids is not below `vocab_size`."""
        pairs = self.logit_bias_pairs
        if pairs and pairs[-1][0] >= vocab_size:
            raise SamplingParamsError(
                f"logit_bias: token id {pairs[-1][0]} is outside the vocabulary (size {vocab_size})"
            )
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise SamplingParamsError(
                f"stop_token_ids: token ids {bad[:5]} are outside the vocabulary (size {vocab_size})"
            )


def _logit_bias(value: object, bad: Callable[[str, str], SamplingParamsError]) -> LogitBias | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        items: list[object] = list(value.items())
    elif isinstance(value, (tuple, list)):
        items = list(value)
    else:
        raise bad("logit_bias", "must map token ids to numbers")
    pairs: dict[int, float] = {}
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise bad("logit_bias", "must map token ids to numbers")
        tok, bias = item
        if isinstance(tok, str) and tok.isascii() and tok.isdecimal() and len(tok) <= 20:
            tok = int(tok)  # JSON object keys are strings (OpenAI's API)
        if not is_int(tok) or tok < 0:
            raise bad("logit_bias", f"token ids must be non-negative integers, not {tok!r}")
        if tok in pairs:
            raise bad("logit_bias", f"token id {tok} appears twice")
        if not is_finite_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise bad("logit_bias", f"values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], not {bias!r}")
        pairs[tok] = float(bias)
    return tuple(sorted(pairs.items())) or None
