"""Replica health (passive ejection, active checks) and the canary's automatic-rollback verdict.

Pure Python over an injected clock; used from the event loop only (not thread-safe).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReplicaHealth:
    """A replica's health as the tracker sees it now."""

    replica_id: str
    is_available: bool
    num_consecutive_failures: int
    ejected_until: float | None
    """Clock time the current ejection lasts at least until; None when in service."""
    num_ejections: int
    """Ejections in a row (each lasts twice the one before, up to `max_eject_s`)."""


@dataclass(slots=True)
class _Replica:
    num_consecutive_failures: int = 0
    ejected_until: float | None = None
    num_ejections: int = 0
    returned_at: float | None = None


class HealthTracker:
    """Takes a replica out of service after `eject_after` consecutive failures.

    The first ejection lasts `eject_s`, each further one twice as long, up to `max_eject_s`; a
    replica that stayed in service for `max_eject_s` starts over at `eject_s`. An ejected
    replica returns only when an active check passes after its ejection time. A failed active
    check counts as a failure, so a replica with no traffic is ejected too.
    """

    def __init__(
        self,
        eject_after: int = 3,
        eject_s: float = 10.0,
        max_eject_s: float = 300.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if eject_after < 1:
            raise ValueError(f"eject_after must be ≥ 1, got {eject_after}")
        if not eject_s > 0 or not max_eject_s >= eject_s:
            raise ValueError(f"need 0 < eject_s ≤ max_eject_s, got {eject_s}, {max_eject_s}")
        self.eject_after = eject_after
        self.eject_s = eject_s
        self.max_eject_s = max_eject_s
        self._now = now
        self._replicas: dict[str, _Replica] = {}

    def is_available(self, replica_id: str) -> bool:
        replica = self._replicas.get(replica_id)
        return replica is None or replica.ejected_until is None

    def is_due_for_check(self, replica_id: str) -> bool:
        """An ejected replica whose ejection time is over: a passing check brings it back."""
        replica = self._replicas.get(replica_id)
        return (
            replica is not None
            and replica.ejected_until is not None
            and self._now() >= replica.ejected_until
        )

    def record_success(self, replica_id: str) -> None:
        """A request on the replica succeeded (an ejected replica still needs a check)."""
        replica = self._replicas.get(replica_id)
        if replica is not None:
            replica.num_consecutive_failures = 0

    def record_failure(self, replica_id: str) -> bool:
        """A request on the replica failed (error or timeout). True when this ejects it."""
        replica = self._replicas.setdefault(replica_id, _Replica())
        replica.num_consecutive_failures += 1
        if replica.ejected_until is not None:
            return False
        if replica.num_consecutive_failures < self.eject_after:
            return False
        now = self._now()
        if replica.returned_at is not None and now - replica.returned_at >= self.max_eject_s:
            replica.num_ejections = 0  # long in service again: forgive the old ejections
        replica.num_ejections += 1
        duration = min(self.eject_s * 2.0 ** (replica.num_ejections - 1), self.max_eject_s)
        replica.ejected_until = now + duration
        return True

    def record_check(self, replica_id: str, ok: bool) -> bool:
        """An active health check's result. True when this brings the replica back."""
        if not ok:
            self.record_failure(replica_id)
            return False
        replica = self._replicas.get(replica_id)
        if replica is None:
            return False
        if replica.ejected_until is None:
            replica.num_consecutive_failures = 0
            return False
        now = self._now()
        if now < replica.ejected_until:
            return False
        replica.ejected_until = None
        replica.num_consecutive_failures = 0
        replica.returned_at = now
        return True

    def status(self, replica_id: str) -> ReplicaHealth:
        replica = self._replicas.get(replica_id, _Replica())
        return ReplicaHealth(
            replica_id,
            replica.ejected_until is None,
            replica.num_consecutive_failures,
            replica.ejected_until,
            replica.num_ejections,
        )

    def forget(self, replica_id: str) -> None:
        """Drop a removed replica's state."""
        self._replicas.pop(replica_id, None)


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    ok: bool
    latency_s: float


@dataclass(frozen=True, slots=True)
class WindowStats:
    """One variant's requests in the monitor's window."""

    num_requests: int
    num_errors: int
    p99_latency_s: float | None
    """Of the successful requests (fast failures would pull it down); None without any."""

    @property
    def error_rate(self) -> float:
        return self.num_errors / self.num_requests if self.num_requests else 0.0


class RollbackMonitor:
    """Compares a canary with its baseline over a sliding window.

    `verdict` gives a reason to roll back when the canary's error rate exceeds the baseline's
    by more than `max_error_rate_delta` (a fraction: 0.05 is five points), or its p99 latency
    exceeds the baseline's times `max_p99_ratio`; None while either has under `min_requests`.
    """

    def __init__(
        self,
        window_s: float,
        min_requests: int,
        max_error_rate_delta: float,
        max_p99_ratio: float,
        *,
        max_samples: int = 100_000,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if not window_s > 0 or min_requests < 1 or max_samples < min_requests:
            raise ValueError("need window_s > 0 and 1 ≤ min_requests ≤ max_samples")
        if not 0 <= max_error_rate_delta < 1 or not max_p99_ratio >= 1:
            raise ValueError("need 0 ≤ max_error_rate_delta < 1 and max_p99_ratio ≥ 1")
        self.window_s = window_s
        self.min_requests = min_requests
        self.max_error_rate_delta = max_error_rate_delta
        self.max_p99_ratio = max_p99_ratio
        self.max_samples = max_samples
        self._now = now
        self._samples: dict[str, deque[_Sample]] = {}

    def observe(self, variant: str, ok: bool, latency_s: float) -> None:
        samples = self._samples.get(variant)
        if samples is None:
            samples = self._samples[variant] = deque(maxlen=self.max_samples)
        samples.append(_Sample(self._now(), ok, latency_s))

    def stats(self, variant: str) -> WindowStats:
        samples = self._samples.get(variant, deque())
        horizon = self._now() - self.window_s
        while samples and samples[0].at < horizon:
            samples.popleft()
        latencies = sorted(sample.latency_s for sample in samples if sample.ok)
        return WindowStats(
            len(samples),
            sum(1 for sample in samples if not sample.ok),
            _p99(latencies),
        )

    def verdict(self, canary: str, baseline: str) -> str | None:
        """Why the canary should be rolled back, or None."""
        new, old = self.stats(canary), self.stats(baseline)
        if min(new.num_requests, old.num_requests) < self.min_requests:
            return None
        if new.error_rate - old.error_rate > self.max_error_rate_delta:
            return (
                f"error rate of {canary!r} is {new.error_rate:.1%} against {old.error_rate:.1%} "
                f"for {baseline!r} (allowed: {self.max_error_rate_delta:.1%} more)"
            )
        if new.p99_latency_s is not None and old.p99_latency_s is not None:
            limit = old.p99_latency_s * self.max_p99_ratio
            if new.p99_latency_s > limit:
                return (
                    f"p99 latency of {canary!r} is {new.p99_latency_s:.3f} s against "
                    f"{old.p99_latency_s:.3f} s for {baseline!r} "
                    f"(allowed: ×{self.max_p99_ratio:g})"
                )
        return None


def _p99(sorted_values: list[float]) -> float | None:
    """Nearest-rank 99th percentile."""
    if not sorted_values:
        return None
    rank = math.ceil(0.99 * len(sorted_values))
    return sorted_values[rank - 1]
