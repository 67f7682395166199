"""Rate limits and quotas per user and per API key (see `limiter.py`)."""

from aicc.quota.limiter import LimiterStats, RateLimiter, UsageLease

__all__ = ["LimiterStats", "RateLimiter", "UsageLease"]
