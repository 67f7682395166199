"""`aicc keys ...`: API keys, one's own (keys:self) or anyone's (keys:read / keys:write)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import click

from aicc.cli.client import ApiClient, CliError, Connection, connection_options
from aicc.cli.identity import given_limits, json_option, limit_options
from aicc.cli.output import echo_json, echo_table, format_time, join


def key_status(key: dict[str, Any], now: datetime | None = None) -> str:
    if key.get("revoked_at"):
        return "revoked"
    expires_at = key.get("expires_at")
    if expires_at and datetime.fromisoformat(expires_at) <= (now or datetime.now(UTC)):
        return "expired"
    return "active"


@click.group()
def keys() -> None:
    """API keys for programs: `Authorization: Bearer aicc-sk-…`."""


@keys.command("list")
@click.option("--user", metavar="USERNAME", help="That user's keys (needs keys:read).")
@click.option("--all-users", is_flag=True, help="Everyone's keys (needs keys:read).")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
@json_option
@connection_options
def keys_list(
    conn: Connection, user: str | None, all_users: bool, include_revoked: bool, as_json: bool
) -> None:
    """List your API keys, or another user's."""
    if user is not None and all_users:
        raise click.UsageError("--user and --all-users exclude each other")
    params: dict[str, Any] = {"include_revoked": "true"} if include_revoked else {}
    path = "/auth/keys"
    if user is not None or all_users:
        path = "/admin/keys"
        if user is not None:
            params["user"] = user
    with ApiClient.open(conn) as client:
        data = client.get(path, params=params)["data"]
    if as_json:
        echo_json(data)
        return
    echo_table(
        ("KEY ID", "NAME", "USER", "HINT", "SCOPES", "EXPIRES", "LAST USED", "STATUS"),
        [
            (
                key["key_id"],
                key["name"],
                key["user"],
                key["hint"],
                join(key["scopes"]) if key["scopes"] is not None else "all",
                format_time(key["expires_at"]),
                format_time(key["last_used_at"]),
                key_status(key),
            )
            for key in data
        ],
    )


@keys.command("create")
@click.option("--name", required=True, help="What the key is for, e.g. `ci-pipeline`.")
@click.option("--user", metavar="USERNAME", help="Create it for that user (needs keys:write).")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    metavar="PERMISSION",
    help="Narrow the key to this permission (repeat for more).  [default: all of the owner's]",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="PATTERN",
    help="Narrow the key to models matching this glob (repeat for more).",
)
@click.option(
    "--expires-in-days", type=click.IntRange(1, 3650), help="Expire after N days.  [default: never]"
)
@click.option("-q", "--quiet", is_flag=True, help="Print only the key.")
@limit_options
@connection_options
def keys_create(
    conn: Connection,
    name: str,
    user: str | None,
    scopes: tuple[str, ...],
    models: tuple[str, ...],
    expires_in_days: int | None,
    quiet: bool,
    **limits: Any,
) -> None:
    """Create an API key. It is printed once, now, and never again."""
    body: dict[str, Any] = {"name": name, **given_limits(limits)}
    if scopes:
        body["scopes"] = list(scopes)
    if models:
        body["models"] = list(models)
    if expires_in_days is not None:
        body["expires_at"] = (datetime.now(UTC) + timedelta(days=expires_in_days)).isoformat()
    path = "/auth/keys"
    if user is not None:
        path = "/admin/keys"
        body["user"] = user
    with ApiClient.open(conn) as client:
        answer = client.post(path, body)
    if quiet:
        click.echo(answer["key"])
        return
    # The key alone goes to stdout, so `aicc keys create ... > file` captures just the key.
    click.echo(
        f"Created API key {answer['key_id']} ({answer['name']}) for {answer['user']}:", err=True
    )
    click.echo(answer["key"])
    click.echo("Save it now: it will not be shown again.", err=True)


@keys.command("revoke")
@click.argument("key_id")
@click.option(
    "--user", metavar="USERNAME", help="Revoke that user's key (needs keys:read and keys:write)."
)
@connection_options
def keys_revoke(conn: Connection, key_id: str, user: str | None) -> None:
    """Revoke an API key at once; programs using it get 401 from then on."""
    quoted = quote(key_id, safe="")
    with ApiClient.open(conn) as client:
        if user is None:
            key = client.delete(f"/auth/keys/{quoted}")
        else:
            # Check the owner first: a mistyped id must not revoke someone else's key.
            owner = client.get(f"/admin/keys/{quoted}")["user"]
            if owner != user:
                raise CliError(f"key {key_id} belongs to {owner}, not {user}; nothing revoked")
            key = client.delete(f"/admin/keys/{quoted}")
    click.echo(f"Revoked {key['key_id']} ({key['name']}) of {key['user']}.")
