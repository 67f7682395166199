"""`aicc audit ...`: read, export and purge the audit log through the API; `verify` checks the
hash chain locally, against the state database and checkpoint file the server writes."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click
import httpx

from aicc.cli.client import ApiClient, CliError, Connection, connection_options
from aicc.cli.identity import json_option
from aicc.cli.output import echo_json, echo_table, format_time

if TYPE_CHECKING:
    from aicc.audit.verify import VerifyReport

T = TypeVar("T")
MAX_PAGE = 1000
"""The server's largest page of `GET /admin/audit`."""
_RELATIVE = re.compile(r"^(\d{1,6})([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_when(value: str, *, now: datetime | None = None) -> datetime:
    """`2025-01-31`, `2025-01-31T12:00:00+01:00` (no zone: UTC), or an age such as `90m`,
    `24h`, `180d` (that long before now).

    Raises click.BadParameter for anything else.
    """
    text = value.strip()
    match = _RELATIVE.fullmatch(text)
    if match:
        amount, unit = match.groups()
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[unit]: int(amount)})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither an ISO-8601 time (2025-01-31T12:00:00Z) nor an age (24h, 7d)"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


class _When(click.ParamType[datetime, Any]):
    name = "TIME"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        return value if isinstance(value, datetime) else parse_when(str(value))


WHEN = _When()


def filter_options(func: Callable[..., T]) -> Callable[..., T]:
    """--since/--until/--user/--model/--status/--action/--after-seq."""
    for option in reversed(
        (
            click.option("--since", type=WHEN, help="From this time or age (e.g. 24h, 7d)."),
            click.option("--until", type=WHEN, help="Before this time or age."),
            click.option("--user", metavar="USERNAME", help="Only this user's calls."),
            click.option("--model", metavar="NAME", help="Only calls to this model."),
            click.option("--status", type=click.IntRange(0, 599), help="Only this HTTP status."),
            click.option("--action", help="Only this action (api.call, audit.purge, …)."),
            click.option(
                "--after-seq", type=click.IntRange(0), help="Only entries after this one."
            ),
        )
    ):
        func = option(func)
    return func


def filter_params(filters: dict[str, Any]) -> dict[str, Any]:
    """The query string of `GET /admin/audit[/export]` for the given options."""
    params = {}
    for name, value in filters.items():
        if value is not None:
            params[name] = value.isoformat() if isinstance(value, datetime) else value
    return params


@click.group()
def audit() -> None:
    """The audit log: every API call, hash-chained (needs the auditor role)."""


@audit.command("query")
@filter_options
@click.option(
    "--limit", type=click.IntRange(1), default=50, show_default=True, help="Entries to show."
)
@json_option
@connection_options
def audit_query(conn: Connection, limit: int, as_json: bool, **filters: Any) -> None:
    """Show audit entries, oldest first."""
    params = filter_params(filters)
    entries: list[dict[str, Any]] = []
    with ApiClient.open(conn) as client:
        while len(entries) < limit:
            params["limit"] = min(MAX_PAGE, limit - len(entries))
            page = client.get("/admin/audit", params=params)
            entries.extend(page["data"])
            if page.get("next_after_seq") is None:
                break
            params["after_seq"] = page["next_after_seq"]
    if as_json:
        echo_json(entries)
        return
    echo_table(
        ("SEQ", "TIME", "USER", "METHOD", "PATH", "STATUS", "MODEL", "MS", "TOKENS", "ACTION"),
        [
            (
                str(entry["seq"]),
                format_time(entry["time"]),
                entry["username"],
                entry["method"],
                entry["path"],
                str(entry["status"]),
                entry["model"],
                _latency(entry.get("latency_ms")),
                _tokens(entry),
                entry["action"],
            )
            for entry in entries
        ],
    )


@audit.command("export")
@filter_options
@click.option("--limit", type=click.IntRange(1), help="At most this many entries.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file instead of standard output.",
)
@connection_options
def audit_export(conn: Connection, limit: int | None, output: Path | None, **filters: Any) -> None:
    """Export entries as JSON Lines in Elastic Common Schema (for Filebeat/Logstash)."""
    params = filter_params({**filters, "limit": limit})
    with ApiClient.open(conn) as client:
        if output is None:
            count = _stream_export(client, params, sys.stdout.buffer)
            click.echo(f"Exported {count} entries.", err=True)
            return
        # Written aside and renamed at the end: an interrupted export leaves no half a file
        # that a shipper could mistake for a whole one.
        partial = output.with_name(output.name + ".partial")
        try:
            with partial.open("wb") as file:
                count = _stream_export(client, params, file)
            os.replace(partial, output)
        finally:
            partial.unlink(missing_ok=True)
    click.echo(f"Exported {count} entries to {output}.", err=True)


@audit.command("purge")
@click.option("--before", type=WHEN, required=True, help="Delete entries older than this.")
@click.option("--force", is_flag=True, help="Do not ask for confirmation.")
@connection_options
def audit_purge(conn: Connection, before: datetime, force: bool) -> None:
    """Delete entries older than --before (needs audit:purge; the purge itself is audited)."""
    cut = before.isoformat(timespec="seconds")
    if not force:
        click.confirm(f"Delete every audit entry older than {cut}?", abort=True, err=True)
    with ApiClient.open(conn) as client:
        answer = client.post("/admin/audit/purge", {"before": before.isoformat()})
    click.echo(f"Purged {answer['purged']} entries older than {cut}.")


@audit.command("verify")
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), help="YAML settings file."
)
@click.option("--state-dir", type=click.Path(path_type=Path), help="The server's state dir.")
@click.option("--database-url", help="State database URL.  [default: SQLite in the state dir]")
def audit_verify(config_file: Path | None, **flags: Any) -> None:
    """Check the hash chain and the signed checkpoints, on this machine (no server needed).

    Exit status 1 names the first entry that was edited, deleted, inserted or cut off."""
    report = _verify_locally(config_file, {k: v for k, v in flags.items() if v is not None})
    if not report.ok:
        raise CliError(
            f"audit log verification FAILED at seq {report.first_bad_seq}: {report.problem} "
            f"({report.num_checked} entries checked)"
        )
    click.echo(f"OK: {report.num_checked} entries checked; the hash chain and checkpoints hold.")


def _verify_locally(config_file: Path | None, flags: dict[str, Any]) -> VerifyReport:
    """Verify the log of the server these settings describe.

    Raises CliError when the settings are invalid, or the database or secret is missing (a
    verify must not create either: it would check a new, empty log and report it intact).
    """
    from aicc.audit.checkpoints import CHECKPOINTS_FILE_NAME
    from aicc.audit.verify import verify
    from aicc.auth.tokens import SECRET_FILE_NAME, load_server_secret
    from aicc.config import load_settings
    from aicc.db import Database
    from aicc.errors import AiccError

    try:
        settings = load_settings(config_file, **flags)
        if settings.database_url is None and not (settings.state_dir / "aicc.db").exists():
            raise CliError(
                f"no state database in {settings.state_dir}; pass --state-dir or --config"
            )
        secret_file = settings.state_dir / SECRET_FILE_NAME
        if settings.secret_key is None and not secret_file.exists():
            raise CliError(f"no server secret at {secret_file}: checkpoints cannot be checked")
        secret = load_server_secret(settings)
        db = Database(settings.resolved_database_url)
    except AiccError as exc:
        raise CliError(exc.message) from exc
    try:
        return verify(db, settings.state_dir / CHECKPOINTS_FILE_NAME, secret)
    finally:
        db.close()


def _stream_export(client: ApiClient, params: dict[str, Any], sink: IO[bytes]) -> int:
    """Copy the export to `sink` as it arrives; the number of lines.

    Raises ApiError / CliError like `ApiClient.request`.
    """
    path = "/admin/audit/export"
    count = 0
    try:
        # ApiClient only returns whole JSON answers; an export can be larger than memory.
        with client._http.stream("GET", path, params=params) as response:
            if response.status_code >= 400:
                response.read()
                raise client._api_error(response, path)
            for chunk in response.iter_bytes():
                sink.write(chunk)
                count += chunk.count(b"\n")
    except httpx.TransportError as exc:
        raise CliError(f"the export from {client.conn.server} broke off: {exc}") from exc
    sink.flush()
    return count


def _latency(value: Any) -> str:
    return "-" if value is None else f"{float(value):.0f}"


def _tokens(entry: dict[str, Any]) -> str:
    prompt, completion = entry.get("prompt_tokens"), entry.get("completion_tokens")
    if prompt is None and completion is None:
        return "-"
    return f"{prompt or 0}+{completion or 0}"
