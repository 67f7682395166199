"""Doctor results as a table for people or JSON for machines, and the exit status."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from aicc.cli.output import render_table
from aicc.doctor.checks import CheckResult, Status

HEADERS = ("CHECK", "STATUS", "VALUE", "FIX")


def exit_code(results: Sequence[CheckResult]) -> int:
    """1 when any check failed, else 0."""
    return 1 if any(result.status is Status.FAIL for result in results) else 0


def summary_line(results: Sequence[CheckResult]) -> str:
    counts = Counter(result.status for result in results)
    parts = [f"{counts[status]} {status.value.lower()}" for status in Status if counts[status]]
    verdict = "problems found" if exit_code(results) else "no failures"
    return f"{verdict}: {', '.join(parts) or 'no checks'}"


def render_text(results: Sequence[CheckResult], *, aligned: bool) -> str:
    """The table and a summary line (no trailing newline)."""
    rows = [(r.name, r.status.value, r.value, r.fix) for r in results]
    return f"{render_table(HEADERS, rows, aligned=aligned)}\n\n{summary_line(results)}"


def to_json(results: Sequence[CheckResult]) -> dict[str, Any]:
    counts = Counter(result.status for result in results)
    return {
        "ok": exit_code(results) == 0,
        "summary": {status.value.lower(): counts[status] for status in Status},
        "checks": [
            {"name": r.name, "status": r.status.value, "value": r.value, "fix": r.fix}
            for r in results
        ],
    }
