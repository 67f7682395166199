"""A benchmark's results as a text table, a JSON file and a PNG chart."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aicc.loadgen.runner import RunResult
from aicc.loadgen.stats import Distribution, Slo, Summary, tpot_s


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What was run, recorded beside the results."""

    base_url: str
    model: str
    endpoint: str
    dataset: str
    num_prompts: int
    input_len: int | None
    """None for a file dataset."""
    output_len: int
    request_rate: float
    warmup: int
    seed: int
    ignore_eos: bool
    percentiles: tuple[float, ...]
    slo: Slo


def level_label(summary: Summary) -> str:
    """The load level: `c=4`, `c=4 rate=2/s`, or `c=inf` for no concurrency limit."""
    label = f"c={summary.concurrency}" if summary.concurrency is not None else "c=inf"
    if not math.isinf(summary.request_rate):
        label += f" rate={summary.request_rate:g}/s"
    return label


def _pname(p: float) -> str:
    return f"P{p:g}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_table(summaries: Sequence[Summary], percentiles: Sequence[float]) -> str:
    """One row per metric, one column per load level; then each level's errors."""
    rows: list[tuple[str, Callable[[Summary], str]]] = [
        ("Successful requests", lambda s: str(s.num_successful)),
        ("Failed requests", lambda s: str(s.num_failed)),
        ("Duration (s)", lambda s: _num(s.duration_s)),
        ("Total input tokens", lambda s: str(s.total_input_tokens)),
        ("Total output tokens", lambda s: str(s.total_output_tokens)),
        ("Request throughput (req/s)", lambda s: _num(s.request_throughput)),
        ("Output token throughput (tok/s)", lambda s: _num(s.output_throughput)),
        ("Total token throughput (tok/s)", lambda s: _num(s.total_token_throughput)),
    ]
    if any(s.goodput is not None for s in summaries):
        rows.append(("Request goodput (req/s)", lambda s: _num(s.goodput)))
    for name, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e")):
        rows.append((f"Mean {name} (ms)", _metric(key, lambda d: d.mean)))
        rows.append((f"Median {name} (ms)", _metric(key, lambda d: d.median)))
        for p in percentiles:
            if p != 50:
                rows.append((f"{_pname(p)} {name} (ms)", _metric(key, _at(p))))
    header = ["", *(level_label(s) for s in summaries)]
    lines = [header, *([label, *(cell(s) for s in summaries)] for label, cell in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(line)
        )
        for line in lines
    ]
    rule = "=" * len(text[0])
    out = [rule, text[0], rule, *text[1:], rule]
    for summary in summaries:
        for message, count in summary.errors[:5]:
            out.append(f"{level_label(summary)}: {count} x {message}")
    return "\n".join(out)


def _metric(key: str, pick: Callable[[Distribution], float | None]) -> Callable[[Summary], str]:
    return lambda s: _num(pick(getattr(s, key)))


def _at(p: float) -> Callable[[Distribution], float | None]:
    return lambda d: d.percentile(p)


def to_json(
    config: BenchConfig, summaries: Sequence[Summary], runs: Sequence[RunResult]
) -> dict[str, Any]:
    """The whole benchmark: config, and per level the statistics and every request."""
    config_data = asdict(config)
    config_data["request_rate"] = _finite(config.request_rate)
    config_data["percentiles"] = list(config.percentiles)
    return {
        "config": config_data,
        "results": [
            {**_summary_json(s), "requests": _requests_json(run)}
            for s, run in zip(summaries, runs, strict=True)
        ],
    }


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else value


def _summary_json(s: Summary) -> dict[str, Any]:
    return {
        "concurrency": s.concurrency,
        "request_rate": _finite(s.request_rate),
        "num_requests": s.num_requests,
        "successful_requests": s.num_successful,
        "failed_requests": s.num_failed,
        "duration_s": s.duration_s,
        "total_input_tokens": s.total_input_tokens,
        "total_output_tokens": s.total_output_tokens,
        "request_throughput": s.request_throughput,
        "output_throughput": s.output_throughput,
        "total_token_throughput": s.total_token_throughput,
        "request_goodput": s.goodput,
        "good_requests": s.num_good,
        "ttft_ms": _dist_json(s.ttft),
        "tpot_ms": _dist_json(s.tpot),
        "itl_ms": _dist_json(s.itl),
        "e2e_ms": _dist_json(s.e2e),
        "errors": [{"message": m, "count": c} for m, c in s.errors],
    }


def _dist_json(d: Distribution) -> dict[str, Any]:
    data: dict[str, Any] = {"count": d.count, "mean": d.mean, "median": d.median}
    data.update({f"p{p:g}": v for p, v in d.percentiles})
    return data


def _requests_json(run: RunResult) -> list[dict[str, Any]]:
    return [
        {
            "start_s": r.start_s,
            "ttft_ms": None if r.ttft_s is None else r.ttft_s * 1000,
            "tpot_ms": None if (t := tpot_s(r)) is None else t * 1000,
            "e2e_ms": r.e2e_s * 1000,
            "itl_ms": [gap * 1000 for gap in r.itl_s],
            "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens,
            "error": r.error,
        }
        for r in run.requests
    ]


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` atomically (a temporary file renamed into place).

    Raises:
        OSError: the directory cannot be written.
    """
    path = path.expanduser()
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2, allow_nan=False)
            file.write("\n")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_plot(
    path: Path, summaries: Sequence[Summary], percentiles: Sequence[float]
) -> str | None:
    """Draw latency percentiles and throughput against the load levels into a PNG.

    Returns None when written, else a note saying why not (matplotlib missing).

    Raises:
        OSError: the file cannot be written.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "no chart: matplotlib is not installed (pip install 'aicc[bench]')"
    # A Figure with its own Agg canvas: no pyplot, so no global figure state or GUI backend.
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    latency, throughput = figure.subplots(1, 2)
    xs = list(range(len(summaries)))
    labels = [level_label(s) for s in summaries]
    high = max((p for p in percentiles if p != 50), default=None)
    plotted: list[float] = []
    for name, key, color in (("TTFT", "ttft", "C0"), ("TPOT", "tpot", "C1"), ("E2E", "e2e", "C2")):
        dists: list[Distribution] = [getattr(s, key) for s in summaries]
        medians = [_nan(d.median) for d in dists]
        latency.plot(xs, medians, "o-", color=color, label=f"{name} P50")
        plotted += medians
        if high is not None:
            values = [_nan(d.percentile(high)) for d in dists]
            latency.plot(xs, values, "s--", color=color, label=f"{name} {_pname(high)}")
            plotted += values
    if any(value > 0 for value in plotted):  # a log axis with no positive value warns
        latency.set_yscale("log")
    latency.set_ylabel("latency (ms)")
    latency.set_title("Latency")
    throughput.plot(xs, [s.output_throughput for s in summaries], "o-", label="output tok/s")
    throughput.plot(xs, [s.total_token_throughput for s in summaries], "s--", label="total tok/s")
    throughput.set_ylabel("tokens per second")
    throughput.set_ylim(bottom=0)
    throughput.set_title("Throughput")
    for axes in (latency, throughput):
        axes.set_xticks(xs, labels)
        axes.set_xlabel("load level (concurrency)")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    figure.savefig(path.expanduser(), format="png", dpi=100)
    return None


def _nan(value: float | None) -> float:
    return math.nan if value is None else value
