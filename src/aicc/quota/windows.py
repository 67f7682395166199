"""Sliding-window counters: how much each subject used in the last `window_s` seconds.

Memory stays bounded: amounts added within `resolution_s` of each other share one bucket (a
stream that records usage per chunk costs one bucket per tenth of a second, not one per chunk),
a subject's buckets are pruned whenever it is read, and `sweep()` drops subjects that went idle.
"""

from __future__ import annotations

import math
from collections import deque


class WindowCounters:
    """Per-subject sums over a sliding window, on a monotonic clock the caller passes in."""

    def __init__(self, window_s: float = 60.0, resolution_s: float = 0.1) -> None:
        if window_s <= 0 or resolution_s < 0:
            raise ValueError("window_s must be > 0 and resolution_s >= 0")
        self.window_s = window_s
        self.resolution_s = resolution_s
        # Per subject: (time of the bucket's first amount, amount), oldest first.
        self._buckets: dict[str, deque[tuple[float, int]]] = {}
        self._totals: dict[str, int] = {}

    def __len__(self) -> int:
        """The number of subjects with anything in their window (as of their last access)."""
        return len(self._buckets)

    def subjects(self) -> list[str]:
        """Subjects with anything in their window (as of their last access)."""
        return list(self._buckets)

    def add(self, subject: str, now: float, amount: int) -> None:
        """Count `amount` (≥ 0) for `subject` at time `now`."""
        if amount <= 0:
            return
        buckets = self._buckets.get(subject)
        if buckets is None:
            buckets = self._buckets[subject] = deque()
            self._totals[subject] = 0
        # A bucket expires with its first amount: the later ones in it are freed up to
        # `resolution_s` early, the price of bounded memory.
        if buckets and now - buckets[-1][0] < self.resolution_s:
            start, previous = buckets[-1]
            buckets[-1] = (start, previous + amount)
        else:
            buckets.append((now, amount))
        self._totals[subject] += amount

    def total(self, subject: str, now: float) -> int:
        """The sum of what `subject` added in the window ending at `now`."""
        self._prune(subject, now)
        return self._totals.get(subject, 0)

    def retry_after(self, subject: str, now: float, limit: int) -> int:
        """Whole seconds (≥ 1) until the subject's total drops below `limit`; the full window
        when it never can (a limit of 0)."""
        total = self.total(subject, now)
        if total < limit:
            return 1
        for start, amount in self._buckets.get(subject, ()):
            total -= amount
            if total < limit:
                return max(1, math.ceil(start + self.window_s - now))
        return max(1, math.ceil(self.window_s))

    def sweep(self, now: float) -> None:
        """Prune every subject, dropping those whose window is empty."""
        for subject in list(self._buckets):
            self._prune(subject, now)

    def _prune(self, subject: str, now: float) -> None:
        buckets = self._buckets.get(subject)
        if buckets is None:
            return
        horizon = now - self.window_s
        while buckets and buckets[0][0] <= horizon:
            self._totals[subject] -= buckets.popleft()[1]
        if not buckets:
            del self._buckets[subject]
            del self._totals[subject]
