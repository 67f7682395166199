"""Summary statistics of a run, with vLLM's definitions.

Latencies are over successful requests: TTFT (send to first text), TPOT (time per output token
after the first: `(e2e - ttft) / (output_tokens - 1)`, only for requests with 2+ tokens), ITL
(every gap between text chunks, pooled over requests) and E2E. Percentiles interpolate linearly
between samples (numpy's default). Throughputs divide successful requests' tokens by the run's
duration. Goodput is the rate of successful requests that met every SLO given; a request with
fewer than 2 output tokens has no TPOT and meets a TPOT SLO.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from aicc.loadgen.runner import RequestResult, RunResult

DEFAULT_PERCENTILES = (99.0,)
SLO_NAMES = ("ttft", "tpot", "e2e")


@dataclass(frozen=True, slots=True)
class Slo:
    """Service-level objectives in milliseconds; None: no objective on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def is_empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None

    def is_met(self, request: RequestResult) -> bool:
        """Whether a request succeeded within every objective."""
        if not request.is_ok or request.ttft_s is None:
            return False
        tpot = tpot_s(request)
        return (
            _within(request.ttft_s, self.ttft_ms)
            and _within(request.e2e_s, self.e2e_ms)
            and (tpot is None or _within(tpot, self.tpot_ms))
        )


def _within(value_s: float, limit_ms: float | None) -> bool:
    return limit_ms is None or value_s * 1000 <= limit_ms


def parse_slo(specs: Iterable[str]) -> Slo:
    """`["ttft:500 tpot:50", "e2e:2000"]` (ms; spaces or commas between) as an Slo.

    Raises:
        ValueError: an unknown metric, a value that is not a positive number, or a repeat.
    """
    limits: dict[str, float] = {}
    for spec in specs:
        for item in re.split(r"[\s,]+", spec.strip()):
            if not item:
                continue
            name, sep, value = item.partition(":")
            name = name.lower()
            if not sep or name not in SLO_NAMES:
                raise ValueError(
                    f"{item!r} is not an SLO; use NAME:MS with NAME one of "
                    f"{', '.join(SLO_NAMES)}, e.g. ttft:500"
                )
            if name in limits:
                raise ValueError(f"the {name} SLO is given twice")
            limits[name] = _positive(value, item)
    return Slo(limits.get("ttft"), limits.get("tpot"), limits.get("e2e"))


def _positive(text: str, item: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{item!r}: the limit must be a positive number of milliseconds")
    return value


def parse_percentiles(text: str) -> tuple[float, ...]:
    """`"50,90,99"` as (50.0, 90.0, 99.0).

    Raises:
        ValueError: a value that is not a number in (0, 100].
    """
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not 0 < value <= 100:
            raise ValueError(f"{item.strip()!r} is not a percentile; use numbers in (0, 100]")
        values.append(value)
    return tuple(sorted(set(values)))


@dataclass(frozen=True, slots=True)
class Distribution:
    """One latency metric in milliseconds; the values are None when there were no samples."""

    count: int
    mean: float | None
    median: float | None
    percentiles: tuple[tuple[float, float | None], ...]
    """(percentile, value) pairs, ascending."""

    @classmethod
    def of(cls, values_s: Sequence[float], percentiles: Sequence[float]) -> Distribution:
        if not values_s:
            return cls(0, None, None, tuple((p, None) for p in percentiles))
        values_ms = np.asarray(values_s, dtype=np.float64) * 1000
        return cls(
            count=len(values_ms),
            mean=float(values_ms.mean()),
            median=float(np.median(values_ms)),
            percentiles=tuple((p, float(np.percentile(values_ms, p))) for p in percentiles),
        )

    def percentile(self, p: float) -> float | None:
        """The value at percentile `p` if it was computed (50 is always the median)."""
        if p == 50:
            return self.median
        return dict(self.percentiles).get(p)


def tpot_s(request: RequestResult) -> float | None:
    """Time per output token after the first; None below 2 tokens or without a first token."""
    if request.ttft_s is None or request.output_tokens < 2:
        return None
    return (request.e2e_s - request.ttft_s) / (request.output_tokens - 1)


@dataclass(frozen=True, slots=True)
class Summary:
    """The statistics of one run (one load level)."""

    concurrency: int | None
    request_rate: float
    num_requests: int
    num_successful: int
    num_failed: int
    duration_s: float
    total_input_tokens: int
    """Prompt tokens of successful requests, as their usage reported (0 without usage)."""
    total_output_tokens: int
    request_throughput: float
    """Successful requests per second."""
    output_throughput: float
    """Output tokens per second."""
    total_token_throughput: float
    """Input plus output tokens per second."""
    goodput: float | None
    """Successful requests per second that met every SLO; None without SLOs."""
    num_good: int | None
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    errors: tuple[tuple[str, int], ...]
    """Distinct error messages with their counts, most frequent first."""


def summarize(
    run: RunResult, percentiles: Sequence[float] = DEFAULT_PERCENTILES, slo: Slo | None = None
) -> Summary:
    """The statistics of `run`."""
    ok = [r for r in run.requests if r.is_ok]
    duration = run.duration_s if run.duration_s > 0 else math.inf
    input_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    num_good = None if slo is None or slo.is_empty else sum(slo.is_met(r) for r in ok)
    errors = collections.Counter(r.error for r in run.requests if r.error is not None)
    return Summary(
        concurrency=run.load.concurrency,
        request_rate=run.load.request_rate,
        num_requests=len(run.requests),
        num_successful=len(ok),
        num_failed=len(run.requests) - len(ok),
        duration_s=run.duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(ok) / duration,
        output_throughput=output_tokens / duration,
        total_token_throughput=(input_tokens + output_tokens) / duration,
        goodput=None if num_good is None else num_good / duration,
        num_good=num_good,
        ttft=Distribution.of([r.ttft_s for r in ok if r.ttft_s is not None], percentiles),
        tpot=Distribution.of([t for r in ok if (t := tpot_s(r)) is not None], percentiles),
        itl=Distribution.of([gap for r in ok for gap in r.itl_s], percentiles),
        e2e=Distribution.of([r.e2e_s for r in ok], percentiles),
        errors=tuple(errors.most_common()),
    )
