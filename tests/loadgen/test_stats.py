"""Summary statistics on hand-made request timings."""

from __future__ import annotations

import math

import pytest

from aicc.loadgen.runner import Load, RequestResult, RunResult
from aicc.loadgen.stats import (
    Distribution,
    Slo,
    parse_percentiles,
    parse_slo,
    summarize,
    tpot_s,
)


def request(
    *,
    ttft_s: float | None = 0.1,
    e2e_s: float = 1.0,
    output_tokens: int = 10,
    itl_s: tuple[float, ...] = (),
    prompt_tokens: int | None = 20,
    error: str | None = None,
) -> RequestResult:
    return RequestResult(
        start_s=0.0,
        e2e_s=e2e_s,
        ttft_s=ttft_s,
        itl_s=itl_s,
        output_tokens=output_tokens,
        prompt_tokens=prompt_tokens,
        error=error,
    )


def run(*requests: RequestResult, duration_s: float = 2.0) -> RunResult:
    return RunResult(Load(concurrency=4), tuple(requests), duration_s)


def test_tpot_is_decode_time_per_token_after_the_first() -> None:
    assert tpot_s(request(ttft_s=0.2, e2e_s=1.1, output_tokens=10)) == pytest.approx(0.1)
    assert tpot_s(request(ttft_s=0.2, e2e_s=0.5, output_tokens=2)) == pytest.approx(0.3)
    assert tpot_s(request(output_tokens=1)) is None
    assert tpot_s(request(ttft_s=None, output_tokens=0)) is None


def test_percentiles_interpolate_linearly() -> None:
    dist = Distribution.of([0.001 * v for v in range(1, 101)], (50.0, 90.0, 99.0))
    assert dist.count == 100
    assert dist.mean == pytest.approx(50.5)
    assert dist.median == pytest.approx(50.5)
    assert dist.percentile(90.0) == pytest.approx(90.1)
    assert dist.percentile(99.0) == pytest.approx(99.01)
    assert dist.percentile(75.0) is None  # not asked for


def test_distribution_without_samples_has_no_values() -> None:
    dist = Distribution.of([], (99.0,))
    assert (dist.count, dist.mean, dist.median, dist.percentile(99.0)) == (0, None, None, None)


def test_summary_counts_only_successful_requests() -> None:
    good = request(ttft_s=0.1, e2e_s=1.0, output_tokens=10, itl_s=(0.1, 0.2), prompt_tokens=20)
    slow = request(ttft_s=0.3, e2e_s=2.1, output_tokens=4, itl_s=(0.6,), prompt_tokens=30)
    failed = request(ttft_s=None, e2e_s=0.01, output_tokens=0, error="HTTP 503: busy")
    summary = summarize(run(good, slow, failed, failed, duration_s=2.0), percentiles=(99.0,))
    assert (summary.num_requests, summary.num_successful, summary.num_failed) == (4, 2, 2)
    assert summary.total_input_tokens == 50
    assert summary.total_output_tokens == 14
    assert summary.request_throughput == pytest.approx(1.0)
    assert summary.output_throughput == pytest.approx(7.0)
    assert summary.total_token_throughput == pytest.approx(32.0)
    assert summary.ttft.mean == pytest.approx(200.0)
    assert summary.e2e.median == pytest.approx(1550.0)
    # TPOT: (1.0 - 0.1) / 9 = 100 ms and (2.1 - 0.3) / 3 = 600 ms.
    assert summary.tpot.mean == pytest.approx(350.0)
    # ITL pools every gap of every request.
    assert summary.itl.count == 3
    assert summary.itl.mean == pytest.approx(300.0)
    assert summary.errors == (("HTTP 503: busy", 2),)
    assert summary.goodput is None


def test_goodput_counts_requests_within_every_slo() -> None:
    fast = request(ttft_s=0.1, e2e_s=1.0, output_tokens=10)  # TPOT 100 ms
    slow_start = request(ttft_s=0.6, e2e_s=1.0, output_tokens=10)
    slow_decode = request(ttft_s=0.1, e2e_s=3.0, output_tokens=10)  # TPOT 322 ms
    one_token = request(ttft_s=0.2, e2e_s=0.2, output_tokens=1)  # no TPOT: meets it
    failed = request(ttft_s=0.1, e2e_s=0.2, error="boom")
    slo = Slo(ttft_ms=500, tpot_ms=150)
    summary = summarize(run(fast, slow_start, slow_decode, one_token, failed), slo=slo)
    assert summary.num_good == 2
    assert summary.goodput == pytest.approx(1.0)
    e2e_only = summarize(run(fast, slow_decode), slo=Slo(e2e_ms=1000))
    assert e2e_only.num_good == 1


def test_slo_limits_are_inclusive() -> None:
    assert Slo(ttft_ms=100).is_met(request(ttft_s=0.1))
    assert not Slo(ttft_ms=99.9).is_met(request(ttft_s=0.1))


def test_parse_slo_accepts_spaces_commas_and_repeats() -> None:
    assert parse_slo(["ttft:500 tpot:50", "E2E:2000"]) == Slo(500.0, 50.0, 2000.0)
    assert parse_slo(["ttft:1.5,e2e:10"]) == Slo(ttft_ms=1.5, e2e_ms=10.0)
    assert parse_slo([]).is_empty


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("latency:5", "not an SLO"),
        ("ttft", "not an SLO"),
        ("ttft:fast", "positive number"),
        ("tpot:0", "positive number"),
        ("e2e:-3", "positive number"),
        ("e2e:inf", "positive number"),
        ("ttft:1 ttft:2", "given twice"),
    ],
)
def test_parse_slo_rejects_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_slo([spec])


def test_parse_percentiles() -> None:
    assert parse_percentiles("99,50, 90") == (50.0, 90.0, 99.0)
    assert parse_percentiles("99.9") == (99.9,)
    for bad in ("0", "101", "p99", "", "nan"):
        with pytest.raises(ValueError, match="not a percentile"):
            parse_percentiles(bad)


def test_zero_duration_gives_zero_rates_not_an_error() -> None:
    summary = summarize(run(request(), duration_s=0.0))
    assert summary.request_throughput == 0.0
    assert not math.isnan(summary.output_throughput)
