"""Prompt prefixes kept in the KV cache for reuse, and the KV operations that move them.

Pure Python like the scheduler. A cached prefix is a llama.cpp sequence id of its own whose cells
hold the KV of some tokens; a new sequence that starts with those tokens borrows the cells with a
`KvCopy` (in llama.cpp's unified cache that only tags the cells with one more sequence id — no
data moves) and computes only the rest of its prompt.

Accounting, so the scheduler's KV budget stays exact:
- a cached prefix *owns* its cells except the leading `num_borrowed` ones, which belong to the
  prefix it was made from (`borrowed_from`);
- a running sequence that borrows from a prefix pins it (`num_users`): it cannot be evicted;
- evicting a prefix hands its cells to the prefixes that borrowed from it (their `num_borrowed`
  drops to 0; if several shared them they are now counted more than once, which errs on the
  safe side: the budget may overestimate use, never underestimate it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KvCopy:
    """Give sequence `dst` the cells of sequence `src` at positions [0, num_tokens)."""

    src: int
    dst: int
    num_tokens: int


@dataclass(frozen=True, slots=True)
class KvRelease:
    """Drop every cell of sequence `seq_id` (cells shared with other sequences survive)."""

    seq_id: int


KvOp = KvCopy | KvRelease


@dataclass(slots=True, eq=False)
class CachedPrefix:
    seq_id: int
    token_ids: tuple[int, ...]
    scope: str
    is_shareable: bool
    """False for a fork's prompt kept only while its sequences run (prefix caching off)."""
    num_borrowed: int = 0
    borrowed_from: CachedPrefix | None = None
    num_users: int = 0
    """Running sequences borrowing from this prefix; while > 0 it cannot be evicted."""
    last_used: int = 0

    @property
    def num_owned(self) -> int:
        return len(self.token_ids) - self.num_borrowed


class PrefixCache:
    """LRU-bounded cached prefixes on a fixed range of llama.cpp sequence ids."""

    def __init__(self, seq_ids: range, *, is_enabled: bool, is_shared_across_scopes: bool) -> None:
        self.is_enabled = is_enabled and len(seq_ids) > 0
        """Keep finished prefixes for other requests (forks share prompts even when False)."""
        self.is_shared_across_scopes = is_shared_across_scopes
        self._free_ids = list(reversed(seq_ids))
        self.entries: list[CachedPrefix] = []
        self._clock = 0
        self.num_hit_tokens = 0

    @property
    def can_share(self) -> bool:
        """Whether there are sequence ids to hold shared prefixes at all."""
        return bool(self._free_ids or self.entries)

    @property
    def num_cells(self) -> int:
        return sum(entry.num_owned for entry in self.entries)

    @property
    def num_shareable(self) -> int:
        return sum(1 for entry in self.entries if entry.is_shareable)

    def match(
        self, token_ids: list[int], scope: str, limit: int
    ) -> tuple[CachedPrefix | None, int]:
        """The shareable prefix with the longest common start with `token_ids` (at most
        `limit` tokens), and that length."""
        best: CachedPrefix | None = None
        best_length = 0
        for entry in self.entries:
            if not entry.is_shareable:
                continue
            if entry.scope != scope and not self.is_shared_across_scopes:
                continue
            length = common_prefix_length(entry.token_ids, token_ids, limit)
            if length > best_length:
                best, best_length = entry, length
        return best, best_length

    def insert(
        self,
        src: int,
        token_ids: tuple[int, ...],
        scope: str,
        *,
        is_shareable: bool,
        num_borrowed: int,
        borrowed_from: CachedPrefix | None,
        ops: list[KvOp],
    ) -> CachedPrefix | None:
        """Keep the first `len(token_ids)` cells of sequence `src` as a prefix. None when
        every id is taken by a pinned prefix."""
        if not self._free_ids and not self.evict_one(ops):
            return None
        entry = CachedPrefix(
            self._free_ids.pop(),
            token_ids,
            scope,
            is_shareable,
            num_borrowed=num_borrowed if borrowed_from is not None else 0,
            borrowed_from=borrowed_from,
            last_used=self._tick(),
        )
        ops.append(KvCopy(src, entry.seq_id, len(token_ids)))
        self.entries.append(entry)
        if is_shareable:
            self._drop_superseded(entry, ops)
        return entry

    def acquire(self, entry: CachedPrefix) -> None:
        entry.num_users += 1
        entry.last_used = self._tick()

    def release(self, entry: CachedPrefix | None, ops: list[KvOp]) -> None:
        if entry is None:
            return
        entry.num_users -= 1
        if entry.num_users == 0 and not entry.is_shareable:
            self._evict(entry, ops)

    def evict_one(self, ops: list[KvOp], *, keep: CachedPrefix | None = None) -> bool:
        """Evict the least recently used unpinned prefix other than `keep`. False: none can go."""
        candidates = [e for e in self.entries if e.num_users == 0 and e is not keep]
        if not candidates:
            return False
        self._evict(min(candidates, key=lambda entry: entry.last_used), ops)
        return True

    def clear(self, ops: list[KvOp]) -> None:
        while self.evict_one(ops):
            pass

    # -- helpers ---------------------------------------------------------------------------
    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _evict(self, entry: CachedPrefix, ops: list[KvOp]) -> None:
        self.entries.remove(entry)
        for other in self.entries:
            if other.borrowed_from is entry:
                other.borrowed_from = None
                other.num_borrowed = 0
        ops.append(KvRelease(entry.seq_id))
        self._free_ids.append(entry.seq_id)

    def _drop_superseded(self, new: CachedPrefix, ops: list[KvOp]) -> None:
        """An unpinned prefix of the same scope that `new` extends is redundant (a chat's
        earlier turn, once the next turn is cached)."""
        for entry in list(self.entries):
            if (
                entry is new
                or not entry.is_shareable
                or entry.num_users
                or entry.scope != new.scope
            ):
                continue
            size = len(entry.token_ids)
            if size <= len(new.token_ids) and new.token_ids[:size] == entry.token_ids:
                self._evict(entry, ops)


def common_prefix_length(a: tuple[int, ...] | list[int], b: list[int], limit: int) -> int:
    """Length of the common start of `a` and `b`, at most `limit` (slice compares run in C)."""
    high = min(len(a), len(b), limit)
    if high <= 0 or a[0] != b[0]:
        return 0
    a = list(a) if isinstance(a, tuple) else a
    if a[:high] == b[:high]:
        return high
    low = 1  # invariant: a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low
