"""RateLimiter on fake clocks: each limit trips at its exact count and frees with its window."""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime

import pytest

from aicc.auth.permissions import Permission
from aicc.auth.principal import Limits, Principal
from aicc.errors import RateLimitedError
from aicc.quota import LimiterStats, RateLimiter
from aicc.quota.windows import WindowCounters

NOON = datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp()
KEY_A = "key_0123456789ab"
KEY_B = "key_ba9876543210"
UNLIMITED = Limits()


class Clock:
    """A clock that moves only when told."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def principal(
    user_limits: Limits = UNLIMITED,
    key_limits: Limits | None = None,
    *,
    key_id: str = KEY_A,
    user_id: int = 7,
) -> Principal:
    return Principal(
        user_id=user_id,
        username=f"alice{user_id}",
        roles=("user",),
        permissions=frozenset({Permission.INFERENCE}),
        models=("*",),
        via="key" if key_limits is not None else "session",
        credential_id=key_id if key_limits is not None else "ses_0123456789ab",
        user_limits=user_limits,
        key_limits=key_limits,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0)


@pytest.fixture
def wall() -> Clock:
    return Clock(NOON)


@pytest.fixture
def limiter(clock: Clock, wall: Clock) -> RateLimiter:
    return RateLimiter(None, clock=clock, wall_clock=wall)


def refusal(limiter: RateLimiter, who: Principal) -> RateLimitedError:
    with pytest.raises(RateLimitedError) as caught:
        limiter.acquire(who)
    return caught.value


def test_rpm_trips_at_the_limit_and_frees_as_the_window_slides(
    limiter: RateLimiter, clock: Clock
) -> None:
    who = principal(Limits(rpm=3))
    for _ in range(3):
        limiter.acquire(who).release()
        clock.now += 10
    error = refusal(limiter, who)
    assert error.message == (
        "rate limit exceeded: 3 requests per minute for user alice7; retry after 30 s"
    )
    assert error.retry_after_s == 30
    assert error.status_code == 429
    clock.now = 1059.5  # the first request is still inside the window
    assert refusal(limiter, who).retry_after_s == 1
    clock.now = 1060.0
    limiter.acquire(who).release()
    assert refusal(limiter, who).retry_after_s == 10  # now the 1010 request frees first


def test_refused_requests_consume_nothing(limiter: RateLimiter, clock: Clock) -> None:
    who = principal(Limits(rpm=1))
    limiter.acquire(who).release()
    for _ in range(5):
        clock.now += 10
        refusal(limiter, who)
    clock.now = 1060.0
    limiter.acquire(who).release()  # the refusals at 1010…1050 were not counted


def test_tpm_refuses_once_the_recorded_tokens_reach_the_limit(
    limiter: RateLimiter, clock: Clock
) -> None:
    who = principal(Limits(tpm=100))
    limiter.acquire(who).record(60, 30)
    clock.now += 10
    limiter.acquire(who).record(5, 4)  # 99 tokens: still under
    clock.now += 10
    lease = limiter.acquire(who)
    lease.record(1, 0)  # 100
    error = refusal(limiter, who)
    assert error.message.startswith("rate limit exceeded: 100 tokens per minute for user alice7")
    # The 90 tokens recorded at 1000 must expire to go under 100: at 1060.
    assert error.retry_after_s == 40
    clock.now = 1060.0
    limiter.acquire(who)


def test_record_adds_up_and_rejects_negative_counts(limiter: RateLimiter) -> None:
    who = principal(Limits(tpm=10))
    lease = limiter.acquire(who)
    for _ in range(5):
        lease.record(1, 1)
    refusal(limiter, who)
    with pytest.raises(ValueError, match=">= 0"):
        lease.record(-1, 0)


def test_max_streams_counts_leases_in_flight(limiter: RateLimiter) -> None:
    who = principal(Limits(max_streams=2))
    first, second = limiter.acquire(who), limiter.acquire(who)
    error = refusal(limiter, who)
    assert error.message == (
        "rate limit exceeded: 2 concurrent streams for user alice7; retry after 1 s"
    )
    assert error.retry_after_s == 1
    second.release()
    third = limiter.acquire(who)
    assert limiter.stats() == LimiterStats(num_subjects=1, num_streams=2)
    first.release()
    third.release()
    assert limiter.stats() == LimiterStats(num_subjects=0, num_streams=0)


def test_release_is_idempotent(limiter: RateLimiter) -> None:
    who = principal(Limits(max_streams=1))
    lease = limiter.acquire(who)
    lease.release()
    lease.release()
    assert lease.is_released
    with limiter.acquire(who):  # a second release must not have freed a slot twice
        refusal(limiter, who)
    assert limiter.stats().num_streams == 0


def test_tpd_lasts_until_utc_midnight(limiter: RateLimiter, clock: Clock, wall: Clock) -> None:
    who = principal(Limits(tpd=1000))
    limiter.acquire(who).record(900, 99)
    clock.now += 3600
    limiter.acquire(who).record(1, 0)
    clock.now += 3600  # the minute windows are long gone; the day is not
    wall.now = NOON + 3600.5
    error = refusal(limiter, who)
    assert error.message.startswith("rate limit exceeded: 1000 tokens per day for user alice7")
    assert error.retry_after_s == 12 * 3600 - 3600  # 10:59:59.5 to midnight, rounded up
    wall.now = NOON + 12 * 3600  # 00:00 UTC the next day
    limiter.acquire(who).record(999, 0)
    limiter.acquire(who).record(0, 1)
    refusal(limiter, who)


def test_the_narrower_of_user_and_key_limits_wins(limiter: RateLimiter) -> None:
    key_a = principal(Limits(rpm=3), Limits(rpm=2), key_id=KEY_A)
    key_b = principal(Limits(rpm=3), Limits(rpm=10), key_id=KEY_B)
    limiter.acquire(key_a).release()
    limiter.acquire(key_a).release()
    error = refusal(limiter, key_a)
    assert f"2 requests per minute for key {KEY_A};" in error.message
    limiter.acquire(key_b).release()  # the user's third: key A's refusal did not count
    error = refusal(limiter, key_b)
    assert "3 requests per minute for user alice7;" in error.message
    other_user = principal(Limits(rpm=3), Limits(rpm=10), key_id=KEY_B, user_id=8)
    limiter.acquire(other_user).release()


def test_record_counts_for_both_user_and_key(limiter: RateLimiter) -> None:
    via_key = principal(Limits(tpm=1000, tpd=1000), Limits(tpm=50, tpd=5000))
    via_session = principal(Limits(tpm=1000, tpd=1000))
    limiter.acquire(via_key).record(30, 20)
    assert f"50 tokens per minute for key {KEY_A}" in refusal(limiter, via_key).message
    limiter.acquire(via_session).record(900, 50)  # the user now holds 1000 in both windows
    error = refusal(limiter, via_session)
    # Both the minute and the day are spent: the day frees last, so it is the one named.
    assert "1000 tokens per day for user alice7" in error.message
    assert error.retry_after_s == 12 * 3600


def test_limits_of_zero_always_refuse(limiter: RateLimiter) -> None:
    assert refusal(limiter, principal(Limits(rpm=0))).retry_after_s == 60
    assert refusal(limiter, principal(Limits(tpm=0))).retry_after_s == 60
    assert refusal(limiter, principal(Limits(max_streams=0))).retry_after_s == 1


def test_unlimited_principals_keep_no_window_state(limiter: RateLimiter) -> None:
    lease = limiter.acquire(principal(Limits(), Limits()))
    lease.record(10, 10)
    assert limiter.stats() == LimiterStats(num_subjects=2, num_streams=1)  # the two streams
    lease.release()
    assert limiter.stats() == LimiterStats(num_subjects=0, num_streams=0)


def test_idle_subjects_are_dropped(limiter: RateLimiter, clock: Clock) -> None:
    for user_id in range(100):
        with limiter.acquire(principal(Limits(rpm=5, tpm=500), user_id=user_id)) as lease:
            lease.record(10, 10)
    assert limiter.stats().num_subjects == 100
    clock.now += 60
    limiter.acquire(principal(Limits(rpm=5), user_id=1000)).release()
    assert limiter.stats().num_subjects == 1


def test_window_buckets_merge_and_prune() -> None:
    windows = WindowCounters(window_s=60.0, resolution_s=0.1)
    for step in range(1000):
        windows.add("user:1", 5.0 + step * 0.00005, 1)  # 1000 adds within 50 ms
    windows.add("user:1", 30.0, 7)
    assert windows._buckets["user:1"] == deque([(5.0, 1000), (30.0, 7)])
    assert windows.total("user:1", 64.9) == 1007
    assert windows.retry_after("user:1", 64.9, 1000) == 1
    assert windows.total("user:1", 65.0) == 7
    assert windows.retry_after("user:1", 65.0, 7) == 25
    assert windows.total("user:1", 90.0) == 0
    assert windows.subjects() == []
    windows.add("user:2", 100.0, 1)
    windows.add("user:3", 130.0, 1)
    windows.sweep(160.0)
    assert windows.subjects() == ["user:3"]
