"""The contract between the engine and whatever runs the model (`inflightd.runtime`): the
engine hands over each step's chunks and copy-on-write copies, and gets logits back. Defined
here, implemented there, so that the engine never imports the runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .sequence import SeqChunk

if TYPE_CHECKING:
    import torch


class Runner(Protocol):
    def execute(self, chunks: list[SeqChunk], copies: list[tuple[int, int]]) -> torch.Tensor:
        """One forward step → logits [num_sampled_chunks, vocab] float32, in chunk order."""
        ...

    def release(self, seq_id: int) -> None:
        """A sequence is gone (finished or aborted): drop any state kept for it."""
        ...
