"""A request's life inside the engine: its tokens, how far the cache holds them, its status.
Pure Python, shared by the scheduler (which decides what runs and is the only code that changes
a Sequence) and the engine (which decides when a sequence is finished)."""

from __future__ import annotations

import enum
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and requeued; holds no blocks
    RUNNING = "running"  # holds blocks; prefilling or decoding
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled by the client, or refused after admission


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's share of a step: what the model runner computes for it."""

    seq_id: int
    token_ids: Seq[int]  # the new tokens fed this step (a prefill chunk, or one decode token)
    start_pos: int  # position of token_ids[0]
    slots: Seq[int]  # [len(token_ids)] cache slots for their K/V
    block_table: Seq[int]  # physical blocks of the whole sequence so far
    sample: bool  # logits wanted for the last token (a prompt's last chunk, or a decode step)


@dataclass
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    max_tokens: int
    priority: int = 0  # lower runs first; FCFS within a priority
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    # Tokens of all_token_ids whose K/V are in the cache or being computed this step. After a
    # recompute preemption it restarts from the prefix-cache hit.
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at (first) admission
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_prefilling(self) -> bool:
        """More than the last sampled token still lacks K/V: the prompt (or, after preemption,
        prompt + outputs) is being (re)computed in chunks."""
        return self.num_computed_tokens < self.num_tokens - (1 if self.output_token_ids else 0)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
