"""What one check reports."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Status(StrEnum):
    PASS = "PASS"
    WARN = "WARN"
    """Works, but is slower, less safe or closer to a limit than it should be."""
    FAIL = "FAIL"
    """Will not work as configured; `aicc doctor` exits 1."""
    SKIP = "SKIP"
    """Not checked (nothing to check, or an earlier failure made it meaningless)."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    """Short and stable, e.g. `cpu features`, `server: kv cache`."""
    status: Status
    value: str
    """What was measured, or why the check was skipped."""
    fix: str = ""
    """One line: what to do about a WARN or FAIL; empty when nothing is to be done."""


def passed(name: str, value: str) -> CheckResult:
    return CheckResult(name, Status.PASS, value)


def warned(name: str, value: str, fix: str) -> CheckResult:
    return CheckResult(name, Status.WARN, value, fix)


def failed(name: str, value: str, fix: str) -> CheckResult:
    return CheckResult(name, Status.FAIL, value, fix)


def skipped(name: str, why: str) -> CheckResult:
    return CheckResult(name, Status.SKIP, why)


def human_bytes(num_bytes: float) -> str:
    """`1.5 GiB`, `235.2 MiB`, `512 B`."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
