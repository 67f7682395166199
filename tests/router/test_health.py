"""Passive ejection and return of replicas on a fake clock, and canary rollback verdicts."""

from __future__ import annotations

import pytest

from aicc.router.health import HealthTracker, RollbackMonitor


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_ejection_after_consecutive_failures_and_return_after_a_check() -> None:
    clock = FakeClock()
    health = HealthTracker(eject_after=3, eject_s=10.0, now=clock)
    assert health.is_available("r")
    assert not health.record_failure("r")
    health.record_success("r")  # a success breaks the run
    assert not health.record_failure("r")
    assert not health.record_failure("r")
    assert health.is_available("r")
    assert health.record_failure("r")  # third in a row: ejected
    assert not health.is_available("r")
    assert health.status("r").ejected_until == 1010.0
    assert health.is_available("other")

    clock.advance(5)
    assert not health.record_check("r", ok=True)  # too early: stays out
    assert not health.is_available("r")
    assert not health.is_due_for_check("r")
    clock.advance(6)
    assert not health.is_available("r")  # time alone does not bring it back
    assert health.is_due_for_check("r")
    assert not health.record_check("r", ok=False)
    assert not health.is_available("r")
    assert health.record_check("r", ok=True)
    assert health.is_available("r")
    assert health.status("r").num_consecutive_failures == 0


def test_repeated_ejections_double_up_to_the_cap_and_are_forgiven_later() -> None:
    clock = FakeClock()
    health = HealthTracker(eject_after=1, eject_s=10.0, max_eject_s=35.0, now=clock)
    durations = []
    for _ in range(4):
        assert health.record_failure("r")
        until = health.status("r").ejected_until
        assert until is not None
        durations.append(until - clock.now)
        clock.now = until
        assert health.record_check("r", ok=True)
    assert durations == [10.0, 20.0, 35.0, 35.0]
    clock.advance(35.0)  # in service for max_eject_s: the next ejection is short again
    assert health.record_failure("r")
    assert health.status("r").ejected_until == clock.now + 10.0
    assert health.status("r").num_ejections == 1


def test_failed_checks_eject_a_replica_without_traffic() -> None:
    health = HealthTracker(eject_after=2, now=FakeClock())
    health.record_check("idle", ok=False)
    assert health.is_available("idle")
    health.record_check("idle", ok=False)
    assert not health.is_available("idle")
    health.forget("idle")
    assert health.is_available("idle")


def test_bad_tracker_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="eject_after"):
        HealthTracker(eject_after=0)
    with pytest.raises(ValueError, match="eject_s"):
        HealthTracker(eject_s=10.0, max_eject_s=5.0)


def monitor(clock: FakeClock) -> RollbackMonitor:
    return RollbackMonitor(
        window_s=60.0, min_requests=20, max_error_rate_delta=0.05, max_p99_ratio=1.5, now=clock
    )


def feed(
    rollback: RollbackMonitor, variant: str, n: int, *, errors: int = 0, latency_s: float = 1.0
) -> None:
    for i in range(n):
        rollback.observe(variant, ok=i >= errors, latency_s=latency_s)


def test_verdict_on_error_rate() -> None:
    clock = FakeClock()
    rollback = monitor(clock)
    feed(rollback, "v1", 100, errors=1)
    feed(rollback, "v2", 19, errors=19)
    assert rollback.verdict("v2", "v1") is None  # too few canary requests yet
    feed(rollback, "v2", 81)
    reason = rollback.verdict("v2", "v1")  # 19% against 1%
    assert reason is not None
    assert "error rate of 'v2' is 19.0% against 1.0%" in reason
    assert rollback.verdict("v1", "v2") is None  # the baseline erring more is no reason

    clock.advance(61)  # the window slides past all of it
    assert rollback.stats("v2").num_requests == 0
    assert rollback.verdict("v2", "v1") is None


def test_error_rate_within_the_margin_passes() -> None:
    rollback = monitor(FakeClock())
    feed(rollback, "v1", 100, errors=2)
    feed(rollback, "v2", 100, errors=6)
    assert rollback.verdict("v2", "v1") is None


def test_verdict_on_p99_latency_counts_successes_only() -> None:
    clock = FakeClock()
    rollback = monitor(clock)
    feed(rollback, "v1", 100, latency_s=1.0)
    feed(rollback, "v2", 97, latency_s=1.0)
    feed(rollback, "v2", 3, latency_s=1.4)
    assert rollback.verdict("v2", "v1") is None  # p99 1.4 s ≤ 1.5 × 1.0 s
    feed(rollback, "v2", 5, latency_s=2.0)
    reason = rollback.verdict("v2", "v1")
    assert reason is not None
    assert "p99 latency of 'v2' is 2.000 s against 1.000 s" in reason
    # Fast failures of the baseline do not lower its p99.
    feed(rollback, "v1", 5, errors=5, latency_s=0.001)
    assert rollback.stats("v1").p99_latency_s == 1.0
