"""A request's state inside the scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

from aicc.engine.prefix_cache import CachedPrefix
from aicc.engine.types import FinishReason


class SequenceStatus(Enum):
    WAITING = auto()
    """Queued; holds no batch slot and no KV cells."""
    RUNNING = auto()
    """Holds a slot; its tokens are being prefilled or decoded."""
    FINISHED = auto()


@dataclass(slots=True, eq=False)
class Sequence:
    """Token bookkeeping for one request. Identity-compared: one object per request."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    """Most tokens to generate (already capped by the context)."""
    arrival: int
    """Order of arrival; older sequences are served first."""
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int = -1
    """The llama.cpp sequence id while RUNNING, else -1."""
    num_computed: int = 0
    """Tokens already in the KV cache. Reset to 0 when preempted (recomputed on return)."""
    finish_reason: FinishReason | None = None
    index: int = 0
    """Which of its request's `n` choices this sequence generates."""
    cache_scope: str = ""
    """Prefix-cache partition (tenant) this sequence may share prefixes with."""
    num_borrowed: int = 0
    """Leading KV cells borrowed from `borrowed_from` (a cached prefix) instead of owned."""
    borrowed_from: CachedPrefix | None = None
    forks: list[Sequence] = field(default_factory=list)
    """The request's other choices, waiting for this sequence's prompt to be computed; they
    then copy its KV and sample from the same logits. They hold slots but are not running."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_kv_cells(self) -> int:
        """KV cells this sequence owns or has claimed (its whole known token list)."""
        return self.num_tokens - self.num_borrowed

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to feed to the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def is_decoding(self) -> bool:
        """True once the prompt is in the KV cache and one token is fed per step."""
        return self.num_computed > 0 and self.num_uncomputed == 1

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output."""
        num_prompt = len(self.prompt_token_ids)
        if stop <= num_prompt:
            return self.prompt_token_ids[start:stop]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : stop - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - num_prompt]
