"""The scheduler's settings and the limits a request must fit, with the errors that refuse a
request at the door. Frozen, checked whole on construction; pure Python."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..checks import is_finite_number, is_int

OrderPolicy = Literal["fcfs", "priority"]
KVPolicy = Literal["recompute", "no_evict"]


@dataclass(frozen=True)
class SchedulerConfig:
    """How the scheduler batches: the `scheduler` section of the daemon's YAML, field for field
    (the config loader builds this class from it). Frozen and checked whole on construction,
    the rules between its fields included; a live reload swaps the whole object
    (`Scheduler.update_config`).

    - `max_num_seqs`: most sequences in one step; `max_num_batched_tokens`: the step's token
      budget (decode tokens first, then prefill chunks).
    - `max_queue_delay_ms`: when nothing runs, how long a new request may wait for companions
      so that their prefills batch together (Triton's dynamic batcher). 0 admits at once.
    - `max_waiting`: most requests waiting for admission (beyond: `QueueFullError`).
    - `chunked_prefill`: split long prompts over steps while the others keep decoding.
    - `policy`: "fcfs" orders by arrival alone; "priority" by `Sequence.priority` (lower first),
      then arrival. Preemption victims are the last in that order.
    - `kv_policy`: what happens when the KV cache runs out. "recompute" preempts the last
      running sequence in policy order (frees its blocks, recomputes it later through the
      prefix cache); "no_evict" admits a request only when its prompt + max_tokens fit beside
      what every running sequence may still claim, so it never preempts.
    """

    max_queue_delay_ms: float = 2.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 512
    chunked_prefill: bool = True
    policy: OrderPolicy = "fcfs"
    kv_policy: KVPolicy = "recompute"

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            _need_count(name, getattr(self, name))
        _need_seconds("max_queue_delay_ms", self.max_queue_delay_ms)
        if not isinstance(self.chunked_prefill, bool):
            raise ValueError(f"chunked_prefill: must be true or false (got {self.chunked_prefill!r})")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy: must be fcfs or priority (got {self.policy!r})")
        if self.kv_policy not in ("recompute", "no_evict"):
            raise ValueError(f"kv_policy: must be recompute or no_evict (got {self.kv_policy!r})")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens: must be ≥ max_num_seqs ({self.max_num_seqs}): every running "
                f"sequence's decode token must fit one step (got {self.max_num_batched_tokens})"
            )

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0


@dataclass(frozen=True)
class RequestLimits:
    """What a single request may ask of the scheduler (from the daemon's `limits` section, with
    `max_model_len` capped by the model's context).

    - `max_model_len`: prompt + max_tokens, in tokens.
    - `queue_timeout_s`: a request still waiting for its first admission after this long is
      taken out of the queue and reported in `SchedulerOutput.expired` (Triton's queue policy
      with REJECT; the server answers 503). A preempted sequence never expires. 0 = no limit.
    """

    max_model_len: int = 8192
    queue_timeout_s: float = 0.0

    def __post_init__(self) -> None:
        _need_count("max_model_len", self.max_model_len)
        _need_seconds("queue_timeout_s", self.queue_timeout_s)

    def check(self, config: SchedulerConfig) -> None:
        """The rule between the two: without chunked prefill a whole prompt must fit one step."""
        if not config.chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"with chunked_prefill off, max_num_batched_tokens ({config.max_num_batched_tokens}) "
                f"must be ≥ max_model_len ({self.max_model_len}): a whole prompt must fit one step"
            )


def _need_count(name: str, value: object) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name}: must be an integer ≥ 1 (got {value!r})")


def _need_seconds(name: str, value: object) -> None:
    if not is_finite_number(value) or value < 0:
        raise ValueError(f"{name}: must be a number ≥ 0 (got {value!r})")


class QueueFullError(Exception):
    """The waiting queue holds `max_waiting` requests (the server answers 503 + Retry-After)."""

    def __init__(self, num_waiting: int, max_waiting: int) -> None:
        super().__init__(f"queue full: {num_waiting} requests waiting (max_waiting = {max_waiting})")
        self.num_waiting = num_waiting
        self.max_waiting = max_waiting


class RequestTooLongError(ValueError):
    """prompt + max_tokens exceeds `max_model_len`, or could never fit the whole KV cache."""

    def __init__(self, message: str, *, prompt_tokens: int, max_tokens: int, limit: int) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.limit = limit  # in tokens
