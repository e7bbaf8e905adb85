"""What the engine hands out: each request's outputs (to its sink, on the engine thread), and
snapshots and counters for metrics and status. Torch-free, so that the server can use them
before the model and the step loop are loaded."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .scheduler_config import RequestLimits, SchedulerConfig
from .sequence import FinishReason


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Timing:
    queue_ms: float  # arrival → first scheduled
    ttft_ms: float  # arrival → first token
    tpot_ms: float  # mean time per output token after the first


@dataclass(frozen=True)
class EngineOutput:
    """What a request's sink receives: a delta of new tokens and text; the last one for a
    request has `finished` set, with its reason, usage and timing."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None  # strings only on the wire (`.value`)
    usage: Usage | None = None
    timing: Timing | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    error: str | None = None  # the engine failed or refused this request (finish_reason "abort")
    cached_tokens: int = 0  # prompt tokens the prefix cache served (known once scheduled)
    # With `error`: refused for load (it waited past queue_timeout_s), not failed; a client may
    # retry later.
    overloaded: bool = False


Sink = Callable[[EngineOutput], None]


@dataclass
class StepStats:
    """Counters since start, for metrics and benchmarks."""

    steps: int = 0
    tokens: int = 0  # computed tokens (prefill + decode)
    model_s: float = 0.0  # inside runner.execute
    step_s: float = 0.0  # whole steps, scheduling and output processing included
    recent: deque[tuple[float, int, int, float, float]] = field(default_factory=lambda: deque(maxlen=256))
    # recent: (time, batch size, tokens, model seconds, step seconds) per step


@dataclass(frozen=True)
class EngineSnapshot:
    num_waiting: int
    num_running: int
    num_blocks: int
    num_free_blocks: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    num_preemptions: int
    steps: int
    last_progress: float
    config: SchedulerConfig
    limits: RequestLimits
