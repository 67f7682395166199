"""Continuous-batching policy: which tokens of which sequences go into the next decode step.

Pure Python over plain data — no llama.cpp import — so it is unit-tested with a fake runner.
One step:  ``schedule()`` → the runner decodes the chunks → ``on_computed()`` → the engine samples
and calls ``append_token()`` / ``finish()``. Slots returned by ``finish()``/``abort()`` and listed
in ``SchedulerOutput.freed_slots`` must have their KV cells released before the next decode.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from aicc.engine.sequence import Sequence, SequenceStatus
from aicc.engine.types import FinishReason


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int
    """Sequences holding a slot at once (the batch width)."""
    max_num_batched_tokens: int
    """Tokens one decode step may carry; must be >= max_num_seqs."""
    num_kv_cells: int
    """KV cache capacity in tokens, shared by all running sequences."""
    max_model_len: int
    """Most tokens (prompt + output) of one sequence; <= num_kv_cells."""
    is_batch_invariant: bool = False
    """Deterministic mode: every chunk gets a `llama_decode` call of its own, and prompts are
    prefilled one chunk per step with boundaries that do not depend on load — so each sequence
    is computed exactly as it would be alone (llama.cpp's CPU kernels pick different code paths
    for different batch shapes, which changes low-order bits and, at near-ties, tokens)."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        if self.max_model_len > self.num_kv_cells:
            raise ValueError("max_model_len must be <= num_kv_cells")


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """Tokens [start, start + num_tokens) of one sequence, fed in this step."""

    seq: Sequence
    start: int
    num_tokens: int
    needs_logits: bool
    """True when the chunk ends the sequence's known tokens, so a new token is sampled."""
    is_decode: bool = False
    """One generated token of a sequence whose prompt is already in the KV cache."""

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids(self.start, self.start + self.num_tokens)


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    """Decode tokens first (oldest sequence first), then prefill chunks."""
    freed_slots: tuple[int, ...]
    """Slots of sequences preempted in this call; release their KV before decoding."""

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    def decode_groups(self, is_batch_invariant: bool) -> list[tuple[ScheduledChunk, ...]]:
        """Chunks per `llama_decode` call: all in one, or (batch-invariant mode) one call each."""
        if is_batch_invariant:
            return [(chunk,) for chunk in self.chunks]
        return [self.chunks] if self.chunks else []


class Scheduler:
    """Owns the waiting queue, the running set, batch slots and the KV budget."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        """Ordered by arrival: the oldest sequence is first."""
        self._free_slots = list(range(config.max_num_seqs))
        self.num_preemptions = 0

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_kv_cells_used(self) -> int:
        """Cells the running sequences hold or have claimed (whole prompts are claimed)."""
        return sum(seq.num_tokens for seq in self.running)

    # -- changes ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.num_prompt_tokens == 0 or seq.num_tokens > self.config.max_model_len:
            raise ValueError(f"sequence {seq.request_id} cannot fit the context")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, request_id: str) -> tuple[Sequence, int] | None:
        """Remove a sequence wherever it is; returns it and the slot to release (-1: none)."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = FinishReason.ABORT
                return seq, -1
        for seq in self.running:
            if seq.request_id == request_id:
                return seq, self.finish(seq, FinishReason.ABORT)
        return None

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks: decodes first, then prefill chunks, then admissions."""
        freed_slots = self._preempt_until_fits()
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        for seq in self.running:
            if seq.is_decoding:
                chunks.append(ScheduledChunk(seq, seq.num_computed, 1, True, is_decode=True))
                budget -= 1
        if self.config.is_batch_invariant:
            self._schedule_one_prefill(chunks)
            return SchedulerOutput(tuple(chunks), tuple(freed_slots))
        for seq in self.running:
            if budget > 0 and not seq.is_decoding:
                budget -= self._add_prefill_chunk(chunks, seq, budget)
        while budget > 0 and self.waiting and self._can_admit(self.waiting[0]):
            seq = self.waiting.popleft()
            self._admit(seq)
            budget -= self._add_prefill_chunk(chunks, seq, budget)
        return SchedulerOutput(tuple(chunks), tuple(freed_slots))

    def on_computed(self, chunks: tuple[ScheduledChunk, ...]) -> None:
        """The runner decoded `chunks`: their tokens are now in the KV cache."""
        for chunk in chunks:
            chunk.seq.num_computed = chunk.start + chunk.num_tokens

    def append_token(self, seq: Sequence, token_id: int, *, is_eog: bool) -> FinishReason | None:
        """Record a sampled token; returns why the sequence must stop, if it must."""
        seq.output_token_ids.append(token_id)
        if is_eog:
            return FinishReason.STOP
        if seq.num_generated >= seq.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> int:
        """Take a running sequence out of the batch; returns its slot, whose KV must be freed."""
        slot = seq.slot
        self.running.remove(seq)
        heapq.heappush(self._free_slots, slot)
        seq.slot = -1
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        return slot

    def preempt_newest(self) -> int:
        """Send the newest running sequence back to the queue (recomputed later).

        Used when the KV budget runs out or the runner finds no KV slot. Returns its slot.
        """
        seq = self.running[-1]
        slot = seq.slot
        self.running.pop()
        heapq.heappush(self._free_slots, slot)
        seq.slot = -1
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        return slot

    # -- helpers ---------------------------------------------------------------------------
    def _preempt_until_fits(self) -> list[int]:
        freed = []
        while len(self.running) > 1 and self.num_kv_cells_used > self.config.num_kv_cells:
            freed.append(self.preempt_newest())
        return freed

    def _schedule_one_prefill(self, chunks: list[ScheduledChunk]) -> None:
        """Batch-invariant mode: the oldest unfinished prefill, or one admission; full-size
        chunks from position 0, whatever else runs."""
        budget = self.config.max_num_batched_tokens
        for seq in self.running:
            if not seq.is_decoding:
                self._add_prefill_chunk(chunks, seq, budget)
                return
        if self.waiting and self._can_admit(self.waiting[0]):
            seq = self.waiting.popleft()
            self._admit(seq)
            self._add_prefill_chunk(chunks, seq, budget)

    def _can_admit(self, seq: Sequence) -> bool:
        if not self._free_slots:
            return False
        # Keep one cell per running sequence free for its next token (a watermark), so an
        # admission does not force a preemption on the very next step.
        needed = self.num_kv_cells_used + seq.num_tokens + len(self.running)
        return needed <= self.config.num_kv_cells

    def _admit(self, seq: Sequence) -> None:
        seq.slot = heapq.heappop(self._free_slots)
        seq.status = SequenceStatus.RUNNING
        seq.num_computed = 0
        self.running.append(seq)
        self.running.sort(key=lambda s: s.arrival)

    def _add_prefill_chunk(self, chunks: list[ScheduledChunk], seq: Sequence, budget: int) -> int:
        num_tokens = min(seq.num_uncomputed, budget)
        needs_logits = num_tokens == seq.num_uncomputed
        chunks.append(ScheduledChunk(seq, seq.num_computed, num_tokens, needs_logits))
        return num_tokens
