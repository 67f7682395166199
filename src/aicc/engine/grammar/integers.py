"""Integer `minimum`/`maximum` (and their exclusive forms) → GBNF that admits exactly that range.

A range is written digit by digit, the way one reads it: `[17, 234]` is `1[7-9] | [2-9][0-9] |
1[0-9][0-9] | 2[0-2][0-9] | 23[0-4]`. The text grows with the square of the number of digits,
so even the widest range is a few kilobytes.
"""

from __future__ import annotations

import math
from typing import Any

MAX_DIGITS = 16
"""llama.cpp's plain `integer` rule allows at most this many digits; a missing bound stops there."""
MAX_INTEGER = 10**MAX_DIGITS - 1
BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def inclusive_bounds(schema: dict[str, Any]) -> tuple[int, int]:
    """The integers `schema`'s bounds allow, as `(low, high)`; a missing side is ±`MAX_INTEGER`.

    Draft 4's boolean `exclusiveMinimum`/`exclusiveMaximum` (still common through OpenAPI 3.0)
    make `minimum`/`maximum` exclusive.

    Raises:
        ValueError: a bound is not a finite number, or no integer of at most `MAX_DIGITS`
            digits satisfies them all; the message names the keyword.
    """
    low, high = -MAX_INTEGER, MAX_INTEGER
    for key in BOUND_KEYS:
        value = schema.get(key)
        if value is None or (key.startswith("exclusive") and isinstance(value, bool)):
            continue
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number")
        exclusive = key.startswith("exclusive") or schema.get(f"exclusive{key.title()}") is True
        if key.lower().endswith("minimum"):
            low = max(low, math.floor(value) + 1 if exclusive else math.ceil(value))
        else:
            high = min(high, math.ceil(value) - 1 if exclusive else math.floor(value))
    if low > high:
        raise ValueError(
            f"no integer of at most {MAX_DIGITS} digits satisfies "
            f"{', '.join(k for k in BOUND_KEYS if k in schema)}"
        )
    return low, high


def integer_range_gbnf(low: int, high: int) -> str:
    """A GBNF expression for the JSON integers in `[low, high]` (no leading zeros, no `-0`).

    Raises:
        ValueError: `low > high`.
    """
    if low > high:
        raise ValueError(f"empty range {low}..{high}")
    alternatives = []
    if low < 0:
        alternatives.append(f'"-" ({_non_negative(max(1, -high), -low)})')
    if high >= 0:
        alternatives.append(_non_negative(max(0, low), high))
    return " | ".join(f"({a})" for a in alternatives) if len(alternatives) > 1 else alternatives[0]


def _non_negative(low: int, high: int) -> str:
    """Numbers in `[low, high]`, `0 <= low <= high`: one part per digit count."""
    parts = []
    full: list[int] = []  # digit counts whose whole range is allowed, contiguous
    for num_digits in range(len(str(low)), len(str(high)) + 1):
        first = 10 ** (num_digits - 1) if num_digits > 1 else 0
        last = 10**num_digits - 1
        lo, hi = max(low, first), min(high, last)
        if num_digits > 1 and (lo, hi) == (first, last):
            full.append(num_digits)
        else:
            parts.append(_same_length(str(lo), str(hi)))
    if full:
        repeat = f"{full[0] - 1}" if len(full) == 1 else f"{full[0] - 1},{full[-1] - 1}"
        parts.insert(1 if len(str(low)) < full[0] else 0, f"[1-9] [0-9]{{{repeat}}}")
    return " | ".join(parts)


def _same_length(low: str, high: str) -> str:
    """Digit strings of `low`'s length in `[low, high]` (leading zeros as given)."""
    if low == high:
        return f'"{low}"'
    i = next(i for i, (a, b) in enumerate(zip(low, high, strict=True)) if a != b)
    head = f'"{low[:i]}" ' if i else ""
    x, y = int(low[i]), int(high[i])
    low_rest, high_rest = low[i + 1 :], high[i + 1 :]
    n = len(low_rest)
    zeros, nines = "0" * n, "9" * n
    tail = "" if n == 0 else " [0-9]" if n == 1 else f" [0-9]{{{n}}}"
    alternatives = []
    if low_rest != zeros:  # x followed by low_rest..99…9; whole digits start at x + 1
        alternatives.append(f'"{x}" ({_same_length(low_rest, nines)})')
        x += 1
    end = y if high_rest == nines else y - 1
    if x <= end:
        alternatives.append((f'"{x}"' if x == end else f"[{x}-{end}]") + tail)
    if high_rest != nines:
        alternatives.append(f'"{y}" ({_same_length(zeros, high_rest)})')
    body = alternatives[0] if len(alternatives) == 1 else "(" + " | ".join(alternatives) + ")"
    return head + body
