"""Per-user and per-key rate limits and quotas: requests and tokens per minute, tokens per UTC
day, streams in flight.

`acquire()` runs before a generation starts and refuses with `RateLimitedError` (HTTP 429 with
Retry-After) when any limit of the caller's user or key is spent; a refused request consumes
nothing. The returned `UsageLease` holds a stream slot until `release()` and takes the tokens
the generation used through `record()`: like OpenAI, token limits refuse the requests that come
after the budget is spent, since a request's usage is only known once it ran.

Everything runs on the event loop, except the daily totals' database writes (`flush()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

from sqlalchemy.exc import SQLAlchemyError

from aicc.auth.principal import Limits, Principal
from aicc.db import Database
from aicc.errors import RateLimitedError
from aicc.quota.daily import DailyUsageStore
from aicc.quota.windows import WindowCounters

logger = logging.getLogger(__name__)

WINDOW_S = 60.0
"""The sliding window of `rpm` and `tpm`."""


@dataclass(frozen=True, slots=True)
class LimiterStats:
    """What the limiter holds, for metrics."""

    num_subjects: int
    """Users and keys with requests, tokens or streams in the limiter's memory."""
    num_streams: int
    """Leases acquired and not yet released."""


@dataclass(frozen=True, slots=True)
class _Subject:
    key: str
    """``user:<id>`` or ``key:<key_id>``: the counters' and `daily_usage`'s key."""
    label: str
    """How error messages name it (``user alice``, ``key key_0123abcd4567``); never a secret."""
    limits: Limits


@dataclass(frozen=True, slots=True)
class _Refusal:
    retry_after_s: int
    limit: str


class UsageLease:
    """One admitted request: holds a stream slot of its user (and key) until `release()`."""

    __slots__ = ("_is_released", "_limiter", "_subjects")

    def __init__(self, limiter: RateLimiter, subjects: tuple[_Subject, ...]) -> None:
        self._limiter = limiter
        self._subjects = subjects
        self._is_released = False

    @property
    def is_released(self) -> bool:
        return self._is_released

    def record(self, num_prompt_tokens: int, num_completion_tokens: int) -> None:
        """Add tokens the request used to the user's and key's per-minute and per-day counts.
        May be called more than once (the counts add up), also after `release()`.

        Raises:
            ValueError: a negative count.
        """
        if num_prompt_tokens < 0 or num_completion_tokens < 0:
            raise ValueError("token counts must be >= 0")
        self._limiter._record(self._subjects, num_prompt_tokens + num_completion_tokens)

    def release(self) -> None:
        """Free the stream slot (idempotent)."""
        if not self._is_released:
            self._is_released = True
            self._limiter._release(self._subjects)

    def __enter__(self) -> UsageLease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


class RateLimiter:
    """Enforces `Principal.user_limits` and `Principal.key_limits` (None fields: unlimited).

    `clock` (monotonic seconds) drives the per-minute windows, `wall_clock` (POSIX seconds) the
    UTC day; tests inject both. Without a database the daily totals live in memory only.
    """

    def __init__(
        self,
        db: Database | None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._requests = WindowCounters(WINDOW_S)
        self._tokens = WindowCounters(WINDOW_S)
        self._daily = DailyUsageStore(db, wall_clock)
        self._streams: dict[str, int] = {}
        self._num_leases = 0
        self._last_sweep = clock()
        self._flush_task: asyncio.Task[None] | None = None

    def acquire(self, principal: Principal) -> UsageLease:
        """Admit one request of `principal`: check every limit of its user and key, then
        count the request and a stream slot. Release the lease when the request ends.

        Raises:
            RateLimitedError: a limit is spent; of several, the one that frees last is named,
                so that retrying after `retry_after_s` is not refused by another at once.
            sqlalchemy.exc.SQLAlchemyError: a daily total could not be loaded.
        """
        now = self._clock()
        self._sweep_if_due(now)
        subjects = _subjects_of(principal)
        refusals = [refusal for subject in subjects for refusal in self._check(subject, now)]
        if refusals:
            worst = max(refusals, key=lambda refusal: refusal.retry_after_s)
            raise RateLimitedError(
                f"rate limit exceeded: {worst.limit}; retry after {worst.retry_after_s} s",
                retry_after_s=worst.retry_after_s,
            )
        for subject in subjects:
            if subject.limits.rpm is not None:
                self._requests.add(subject.key, now, 1)
            # Streams are counted whatever the limits, so a limit set later sees them.
            self._streams[subject.key] = self._streams.get(subject.key, 0) + 1
        self._num_leases += 1
        return UsageLease(self, subjects)

    def admit(self, principal: Principal) -> None:
        """Admit one request that generates nothing (model lists, tokenization): it counts
        against requests per minute, and is refused like `acquire` when a limit is spent, but
        holds no stream slot.

        Raises:
            RateLimitedError: as `acquire`.
            sqlalchemy.exc.SQLAlchemyError: a daily total could not be loaded.
        """
        if _is_unlimited(principal):
            return  # the common case costs nothing
        self.acquire(principal).release()

    def stats(self) -> LimiterStats:
        keys = set(self._streams)
        keys.update(self._requests.subjects(), self._tokens.subjects())
        return LimiterStats(num_subjects=len(keys), num_streams=self._num_leases)

    def start(self, flush_interval_s: float = 5.0) -> None:
        """Write daily totals every `flush_interval_s` seconds (call on the running loop)."""
        if self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(
                self._flush_periodically(flush_interval_s), name="quota-flush"
            )

    async def flush(self) -> None:
        """Write the buffered daily token counts, off the event loop.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the write failed (the counts stay buffered).
        """
        await asyncio.to_thread(self._daily.flush)

    async def close(self) -> None:
        """Stop the periodic writer and write what is buffered (a failure is logged)."""
        if self._flush_task is not None:
            self._flush_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_task
            self._flush_task = None
        try:
            await self.flush()
        except SQLAlchemyError:
            logger.exception("daily token usage could not be saved; today's totals are lost")

    def _check(self, subject: _Subject, now: float) -> Iterator[_Refusal]:
        limits, key, label = subject.limits, subject.key, subject.label
        if limits.rpm is not None and self._requests.total(key, now) >= limits.rpm:
            retry = self._requests.retry_after(key, now, limits.rpm)
            yield _Refusal(retry, f"{limits.rpm} requests per minute for {label}")
        if limits.tpm is not None and self._tokens.total(key, now) >= limits.tpm:
            retry = self._tokens.retry_after(key, now, limits.tpm)
            yield _Refusal(retry, f"{limits.tpm} tokens per minute for {label}")
        if limits.max_streams is not None and self._streams.get(key, 0) >= limits.max_streams:
            # A slot frees when some stream ends: no way to know when, so ask again soon.
            yield _Refusal(1, f"{limits.max_streams} concurrent streams for {label}")
        if limits.tpd is not None and self._daily.total(key) >= limits.tpd:
            retry = self._daily.seconds_to_midnight()
            yield _Refusal(retry, f"{limits.tpd} tokens per day for {label}")

    def _record(self, subjects: tuple[_Subject, ...], num_tokens: int) -> None:
        if num_tokens == 0:
            return
        now = self._clock()
        for subject in subjects:
            if subject.limits.tpm is not None:
                self._tokens.add(subject.key, now, num_tokens)
            # Daily totals are kept for every subject: they are the usage record too.
            self._daily.add(subject.key, num_tokens)

    def _release(self, subjects: tuple[_Subject, ...]) -> None:
        self._num_leases -= 1
        for subject in subjects:
            remaining = self._streams[subject.key] - 1
            if remaining:
                self._streams[subject.key] = remaining
            else:
                del self._streams[subject.key]

    def _sweep_if_due(self, now: float) -> None:
        # Subjects that stopped calling are never read again: drop their expired windows.
        if now - self._last_sweep >= WINDOW_S:
            self._last_sweep = now
            self._requests.sweep(now)
            self._tokens.sweep(now)

    async def _flush_periodically(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush()
            except SQLAlchemyError:
                logger.warning("saving daily token usage failed; retrying later", exc_info=True)


_NO_LIMITS = Limits()


def _is_unlimited(principal: Principal) -> bool:
    key_limits = principal.key_limits
    return principal.user_limits == _NO_LIMITS and (key_limits is None or key_limits == _NO_LIMITS)


def _subjects_of(principal: Principal) -> tuple[_Subject, ...]:
    user_id, username = principal.user_id, principal.username
    user = _Subject(f"user:{user_id}", f"user {username}", principal.user_limits)
    if principal.key_limits is None:
        return (user,)
    key_id = principal.credential_id
    return (user, _Subject(f"key:{key_id}", f"key {key_id}", principal.key_limits))
