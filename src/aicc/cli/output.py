"""How CLI commands print: aligned tables and relative times on a terminal; tab-separated
columns and ISO-8601 times when piped, so `cut -f` and `sort` work; JSON with `--json`."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click

EMPTY = "-"


def is_terminal() -> bool:
    return sys.stdout.isatty()


def clean(value: object) -> str:
    """One printable line. Names and descriptions come from the server; a control character
    in them must not move the cursor or recolour the user's terminal."""
    if value is None:
        return EMPTY
    text = str(value)
    return "".join(ch if ch.isprintable() else " " if ch in "\t\n\r" else "?" for ch in text)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, aligned: bool) -> str:
    """Headers and rows as text (no trailing newline). Cells are cleaned first."""
    lines = [list(headers), *([clean(cell) for cell in row] for row in rows)]
    if not aligned:
        return "\n".join("\t".join(line) for line in lines)
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        "   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    click.echo(render_table(headers, rows, aligned=is_terminal()))


def echo_fields(fields: Sequence[tuple[str, object]]) -> None:
    """`name: value` lines, names aligned, for one object (`show`, `whoami`)."""
    width = max(len(name) for name, _ in fields) + 1
    for name, value in fields:
        click.echo(f"{name + ':':<{width}} {clean(value)}")


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def join(values: Sequence[str] | None) -> str:
    return ",".join(values) if values else EMPTY


def format_time(
    iso: str | None, *, relative: bool | None = None, now: datetime | None = None
) -> str:
    """An ISO-8601 time from the server, as "3 hours ago"/"in 5 days" on a terminal."""
    if not iso:
        return EMPTY
    if relative is None:
        relative = is_terminal()
    if not relative:
        return iso
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = ((now or datetime.now(UTC)) - when).total_seconds()
    span = _span(abs(seconds))
    if span is None:
        return "just now"
    return f"{span} ago" if seconds > 0 else f"in {span}"


def _span(seconds: float) -> str | None:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return None
