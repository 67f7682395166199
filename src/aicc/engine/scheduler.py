"""Continuous-batching policy: which tokens of which sequences go into the next decode step.

Pure Python over plain data — no llama.cpp import — so it is unit-tested with a fake runner.
One step:  ``schedule()`` → the runner decodes the chunks → ``on_computed()`` → the engine samples
and calls ``append_token()`` / ``finish()``. Every KV change the scheduler decides (free a slot,
borrow a cached prefix, keep a finished one) is queued as a `KvOp`; the engine applies
``take_kv_ops()`` in order before each decode.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from aicc.engine.prefix_cache import (
    CachedPrefix,
    KvCopy,
    KvOp,
    KvRelease,
    PrefixCache,
    common_prefix_length,
)
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
    num_prefix_slots: int = 0
    """Sequence ids (after the batch slots) that hold shared prefixes: a request's `n` choices
    share its prompt through them, and finished prefixes are cached in them. 0: no sharing."""
    is_prefix_caching: bool = False
    """Keep finished sequences' KV for later requests that start with the same tokens."""
    is_prefix_shared_across_scopes: bool = False
    """Let any request reuse any cached prefix; by default only requests of the same scope."""
    min_shared_running_prefix: int = 64
    """A running sequence's prompt is shared with a newcomer only if this many tokens match."""
    min_cached_prefix: int = 32
    """A cached prefix is reused only if this many tokens match: a few shared template tokens
    save nothing, and computing the prompt whole keeps short prompts' logits independent of
    what happens to be cached."""

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

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    def decode_groups(self, is_batch_invariant: bool) -> list[tuple[ScheduledChunk, ...]]:
        """Chunks per `llama_decode` call: all in one, or (batch-invariant mode) one call each."""
        if is_batch_invariant:
            return [(chunk,) for chunk in self.chunks]
        return [self.chunks] if self.chunks else []


class Scheduler:
    """Owns the waiting queue, the running set, batch slots, shared prefixes and the KV budget."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        """Ordered by arrival: the oldest sequence is first."""
        self._free_slots = list(range(config.max_num_seqs))
        self.prefixes = PrefixCache(
            range(config.max_num_seqs, config.max_num_seqs + config.num_prefix_slots),
            is_enabled=config.is_prefix_caching,
            is_shared_across_scopes=config.is_prefix_shared_across_scopes,
        )
        self._kv_ops: list[KvOp] = []
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
        """Cells that running sequences own or have claimed (whole prompts are claimed), plus
        the cells of shared prefixes."""
        return sum(seq.num_kv_cells for seq in self.running) + self.prefixes.num_cells

    @property
    def can_fork(self) -> bool:
        """Whether a request's `n` choices can share their prompt's KV."""
        return self.prefixes.can_share and not self.config.is_batch_invariant

    def take_kv_ops(self) -> list[KvOp]:
        """KV changes decided since the last call, in the order they must be applied."""
        ops, self._kv_ops = self._kv_ops, []
        return ops

    # -- changes ---------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a sequence; its `forks` (other choices of the request) are admitted with it."""
        if seq.num_prompt_tokens == 0 or seq.num_tokens > self.config.max_model_len:
            raise ValueError(f"sequence {seq.request_id} cannot fit the context")
        if len(seq.forks) + 1 > self.config.max_num_seqs:
            raise ValueError(f"sequence {seq.request_id} has more choices than batch slots")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Remove every sequence of a request, wherever it is; returns them."""
        found: list[Sequence] = []
        for seq in [seq for seq in self.waiting if seq.request_id == request_id]:
            self.waiting.remove(seq)
            for member in (seq, *seq.forks):
                member.status = SequenceStatus.FINISHED
                member.finish_reason = FinishReason.ABORT
                found.append(member)
            seq.forks = []
        for seq in [seq for seq in self.running if seq.request_id == request_id]:
            found.extend(seq.forks)
            self._release_forks(seq, FinishReason.ABORT)
            self.finish(seq, FinishReason.ABORT)
            found.append(seq)
        return found

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks: decodes first, then prefill chunks, then admissions."""
        self._preempt_until_fits()
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        for seq in self.running:
            if seq.is_decoding:
                chunks.append(ScheduledChunk(seq, seq.num_computed, 1, True, is_decode=True))
                budget -= 1
        if self.config.is_batch_invariant:
            self._schedule_one_prefill(chunks)
            return SchedulerOutput(tuple(chunks))
        for seq in self.running:
            if budget > 0 and not seq.is_decoding:
                budget -= self._add_prefill_chunk(chunks, seq, budget)
        while budget > 0 and self.waiting and self._try_admit(self.waiting[0]):
            seq = self.waiting.popleft()
            budget -= self._add_prefill_chunk(chunks, seq, budget)
        return SchedulerOutput(tuple(chunks))

    def on_computed(self, chunks: tuple[ScheduledChunk, ...]) -> None:
        """The runner decoded `chunks`: their tokens are now in the KV cache."""
        for chunk in chunks:
            chunk.seq.num_computed = chunk.start + chunk.num_tokens

    def fork(self, seq: Sequence) -> list[Sequence]:
        """`seq`'s prompt is computed: its waiting choices borrow the prompt's KV and join the
        batch, ready to sample from the same logits. Returns them (empty if none waited).

        If no id is free for the shared prompt, the choices prefill it themselves instead.
        """
        forks, seq.forks = seq.forks, []
        if not forks:
            return []
        num_tokens = seq.num_computed
        shared = self.prefixes.insert(
            seq.slot,
            tuple(seq.token_ids(0, num_tokens)),
            seq.cache_scope,
            is_shareable=self.prefixes.is_enabled,
            num_borrowed=seq.num_borrowed,
            borrowed_from=seq.borrowed_from,
            ops=self._kv_ops,
        )
        for child in forks:
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
        self.running.sort(key=lambda s: s.arrival)
        if shared is None:
            return []
        for member in (seq, *forks):
            self._borrow(member, shared, num_tokens)
        self.prefixes.num_hit_tokens += num_tokens * len(forks)  # the parent computed them once
        return forks

    def append_token(self, seq: Sequence, token_id: int, *, is_eog: bool) -> FinishReason | None:
        """Record a sampled token; returns why the sequence must stop, if it must."""
        seq.output_token_ids.append(token_id)
        if is_eog:
            return FinishReason.STOP
        if seq.num_generated >= seq.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take a running sequence out of the batch; keep its prompt's KV as a cached prefix if
        prefix caching is on (and the prompt is long enough to be reused), then free its slot.

        Only the prompt is kept: in llama.cpp's unified KV cache every sequence attends over the
        whole used range of cells (masked), so each cached cell slows every decode a little;
        prompts (system prompts, earlier turns) are what later requests share.
        """
        num_cached = min(seq.num_computed, seq.num_prompt_tokens)
        if self.prefixes.is_enabled and num_cached >= self.config.min_cached_prefix:
            self.prefixes.insert(
                seq.slot,
                tuple(seq.prompt_token_ids[:num_cached]),
                seq.cache_scope,
                is_shareable=True,
                num_borrowed=seq.num_borrowed,
                borrowed_from=seq.borrowed_from,
                ops=self._kv_ops,
            )
        self._leave_slot(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def preempt_newest(self) -> None:
        """Send the newest running sequence back to the queue (recomputed later).

        Used when the KV budget runs out or the runner finds no KV slot.
        """
        seq = self.running.pop()
        self._release_forks(seq, None)
        self._leave_slot(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def evict_prefix(self) -> bool:
        """Free the least recently used cached prefix; False if none can go."""
        return self.prefixes.evict_one(self._kv_ops)

    # -- helpers ---------------------------------------------------------------------------
    def _preempt_until_fits(self) -> None:
        while self.num_kv_cells_used > self.config.num_kv_cells and self.evict_prefix():
            pass
        while len(self.running) > 1 and self.num_kv_cells_used > self.config.num_kv_cells:
            self.preempt_newest()

    def _schedule_one_prefill(self, chunks: list[ScheduledChunk]) -> None:
        """Batch-invariant mode: the oldest unfinished prefill, or one admission; full-size
        chunks from position 0, whatever else runs."""
        budget = self.config.max_num_batched_tokens
        for seq in self.running:
            if not seq.is_decoding:
                self._add_prefill_chunk(chunks, seq, budget)
                return
        if self.waiting and self._try_admit(self.waiting[0]):
            seq = self.waiting.popleft()
            self._add_prefill_chunk(chunks, seq, budget)

    def _try_admit(self, seq: Sequence) -> bool:
        """Admit `seq` (and its forks) if slots and KV cells allow, borrowing the longest
        cached prefix; evicts unpinned cached prefixes to make room."""
        if len(self._free_slots) < 1 + len(seq.forks):
            return False
        shared, num_shared = self._find_prefix(seq)
        # Keep one cell per running sequence free for its next token (a watermark), so an
        # admission does not force a preemption on the very next step.
        while True:
            needed = (
                self.num_kv_cells_used
                + seq.num_tokens
                - num_shared
                + len(self.running)
                + len(seq.forks)
            )
            if needed <= self.config.num_kv_cells:
                break
            if not self.prefixes.evict_one(self._kv_ops, keep=shared):
                return False
        seq.slot = heapq.heappop(self._free_slots)
        for child in seq.forks:
            child.slot = heapq.heappop(self._free_slots)
        seq.status = SequenceStatus.RUNNING
        seq.num_computed = 0
        if shared is not None:
            self._borrow(seq, shared, num_shared)
            self.prefixes.num_hit_tokens += num_shared
        self.running.append(seq)
        self.running.sort(key=lambda s: s.arrival)
        return True

    def _find_prefix(self, seq: Sequence) -> tuple[CachedPrefix | None, int]:
        """The cached prefix to borrow and how many tokens of it (at least one token is always
        left to compute, for the logits). A running sequence's computed prompt that matches
        better is first published as a cached prefix."""
        if self.config.is_batch_invariant or not self.prefixes.is_enabled:
            return None, 0
        tokens = seq.token_ids(0, seq.num_tokens)
        limit = seq.num_tokens - 1
        shared, num_shared = self.prefixes.match(tokens, seq.cache_scope, limit)
        if num_shared < self.config.min_cached_prefix:
            shared, num_shared = None, 0
        source, num_source = None, self.config.min_shared_running_prefix - 1
        for other in self.running:
            if other.cache_scope == seq.cache_scope or self.prefixes.is_shared_across_scopes:
                # Its computed prompt only (no copy of its tokens): a newcomer's prompt rarely
                # continues into another request's generated text.
                num_computed = min(other.num_computed, other.num_prompt_tokens)
                length = common_prefix_length(
                    other.prompt_token_ids, tokens, min(limit, num_computed)
                )
                if length > max(num_source, num_shared):
                    source, num_source = other, length
        if source is None:
            return shared, num_shared
        published = self.prefixes.insert(
            source.slot,
            tuple(tokens[:num_source]),
            source.cache_scope,
            is_shareable=True,
            num_borrowed=min(source.num_borrowed, num_source),
            borrowed_from=source.borrowed_from,
            ops=self._kv_ops,
        )
        if published is None:
            return shared, num_shared
        self._borrow(source, published, num_source)
        return published, num_source

    def _borrow(self, seq: Sequence, shared: CachedPrefix, num_tokens: int) -> None:
        self.prefixes.release(seq.borrowed_from, self._kv_ops)
        if seq.slot >= 0 and seq.num_computed < num_tokens:
            self._kv_ops.append(KvCopy(shared.seq_id, seq.slot, num_tokens))
        self.prefixes.acquire(shared)
        seq.borrowed_from = shared
        seq.num_borrowed = num_tokens
        seq.num_computed = max(seq.num_computed, num_tokens)

    def _leave_slot(self, seq: Sequence) -> None:
        self._kv_ops.append(KvRelease(seq.slot))
        heapq.heappush(self._free_slots, seq.slot)
        seq.slot = -1
        self.prefixes.release(seq.borrowed_from, self._kv_ops)
        seq.borrowed_from = None
        seq.num_borrowed = 0

    def _release_forks(self, seq: Sequence, reason: FinishReason | None) -> None:
        """Give back the slots of choices still waiting for `seq`'s prompt; they stay attached
        (preemption) or finish too (abort)."""
        for child in seq.forks:
            if child.slot >= 0:
                heapq.heappush(self._free_slots, child.slot)
                child.slot = -1
            if reason is not None:
                child.status = SequenceStatus.FINISHED
                child.finish_reason = reason
        if reason is not None:
            seq.forks = []

    def _add_prefill_chunk(self, chunks: list[ScheduledChunk], seq: Sequence, budget: int) -> int:
        num_tokens = min(seq.num_uncomputed, budget)
        needs_logits = num_tokens == seq.num_uncomputed
        chunks.append(ScheduledChunk(seq, seq.num_computed, num_tokens, needs_logits))
        return num_tokens
