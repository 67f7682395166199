"""`aicc users ...`: people and service accounts (needs users:read / users:write)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from aicc.cli.client import ApiClient, Connection, connection_options
from aicc.cli.identity import (
    LIMIT_NAMES,
    format_limits,
    given_limits,
    json_option,
    limit_options,
    read_password,
)
from aicc.cli.output import echo_fields, echo_json, echo_table, format_time, join

_ROLE = click.option(
    "--role", "roles", multiple=True, metavar="ROLE", help="Role to grant (repeat for more)."
)


def user_path(username: str) -> str:
    # Quoted: a name typed on the command line must not become another path ("../roles").
    return f"/admin/users/{quote(username, safe='')}"


def _status(user: dict[str, Any]) -> str:
    if user.get("is_disabled"):
        return "disabled"
    return "locked" if user.get("is_locked") else "active"


@click.group()
def users() -> None:
    """People and service accounts."""


@users.command("list")
@json_option
@connection_options
def users_list(conn: Connection, as_json: bool) -> None:
    """List all users."""
    with ApiClient.open(conn) as client:
        data = client.get("/admin/users")["data"]
    if as_json:
        echo_json(data)
        return
    echo_table(
        ("USERNAME", "ROLES", "SOURCE", "STATUS", "MFA", "LAST LOGIN"),
        [
            (
                user["username"],
                join(user["roles"]),
                user["source"],
                _status(user),
                "yes" if user["is_totp_enabled"] else "no",
                format_time(user["last_login_at"]),
            )
            for user in data
        ],
    )


@users.command("show")
@click.argument("username")
@json_option
@connection_options
def users_show(conn: Connection, username: str, as_json: bool) -> None:
    """Show one user."""
    with ApiClient.open(conn) as client:
        user = client.get(user_path(username))
    if as_json:
        echo_json(user)
    else:
        echo_user(user)


def echo_user(user: dict[str, Any]) -> None:
    echo_fields(
        [
            ("username", user["username"]),
            ("display name", user.get("display_name")),
            ("source", user["source"]),
            ("roles", join(user["roles"])),
            ("status", _status(user)),
            ("mfa", "yes" if user["is_totp_enabled"] else "no"),
            ("limits", format_limits(user.get("limits"))),
            ("created", format_time(user.get("created_at"))),
            ("last login", format_time(user.get("last_login_at"))),
        ]
    )


@users.command("create")
@click.argument("username")
@_ROLE
@click.option("--display-name", help="Full name, for people reading lists.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--no-password", is_flag=True, help="No password: the account can only use API keys.")
@limit_options
@connection_options
def users_create(
    conn: Connection,
    username: str,
    roles: tuple[str, ...],
    display_name: str | None,
    password_stdin: bool,
    no_password: bool,
    **limits: Any,
) -> None:
    """Create a user (roles default to `user`)."""
    if password_stdin and no_password:
        raise click.UsageError("--password-stdin and --no-password exclude each other")
    body: dict[str, Any] = {"username": username, **given_limits(limits)}
    if not no_password:
        body["password"] = read_password(from_stdin=password_stdin, confirm=True)
    if roles:
        body["roles"] = list(roles)
    if display_name is not None:
        body["display_name"] = display_name
    with ApiClient.open(conn) as client:
        user = client.post("/admin/users", body)
    click.echo(f"Created user {user['username']} (roles: {join(user['roles'])}).")


@users.command("update")
@click.argument("username")
@click.option(
    "--role", "roles", multiple=True, metavar="ROLE", help="Replace the roles (repeat for more)."
)
@click.option("--display-name", help="Full name, for people reading lists.")
@click.option("--unlock", is_flag=True, help="Clear a lockout after failed logins.")
@limit_options
@connection_options
def users_update(
    conn: Connection,
    username: str,
    roles: tuple[str, ...],
    display_name: str | None,
    unlock: bool,
    **limits: Any,
) -> None:
    """Change a user's roles, name, limits or lockout."""
    changed_limits = given_limits(limits)
    body: dict[str, Any] = {}
    if roles:
        body["roles"] = list(roles)
    if display_name is not None:
        body["display_name"] = display_name
    if unlock:
        body["unlock"] = True
    if not body and not changed_limits:
        raise click.UsageError("nothing to change; see `aicc users update --help`")
    with ApiClient.open(conn) as client:
        if changed_limits:
            # The server replaces all four limits at once; keep the ones not named here.
            current = client.get(user_path(username)).get("limits") or {}
            body.update({name: current.get(name) for name in LIMIT_NAMES})
            body.update(changed_limits)
        user = client.patch(user_path(username), body)
    echo_user(user)


def _patch(conn: Connection, username: str, body: dict[str, Any], done: str) -> None:
    with ApiClient.open(conn) as client:
        user = client.patch(user_path(username), body)
    click.echo(f"{done} {user['username']}.")


@users.command("disable")
@click.argument("username")
@connection_options
def users_disable(conn: Connection, username: str) -> None:
    """Stop a user from logging in or using keys."""
    _patch(conn, username, {"is_disabled": True}, "Disabled")


@users.command("enable")
@click.argument("username")
@connection_options
def users_enable(conn: Connection, username: str) -> None:
    """Let a disabled user back in."""
    _patch(conn, username, {"is_disabled": False}, "Enabled")


@users.command("passwd")
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@connection_options
def users_passwd(conn: Connection, username: str, password_stdin: bool) -> None:
    """Set another user's password."""
    password = read_password(from_stdin=password_stdin, prompt="New password", confirm=True)
    _patch(conn, username, {"password": password}, "Set the password of")


@users.command("revoke-sessions")
@click.argument("username")
@connection_options
def users_revoke_sessions(conn: Connection, username: str) -> None:
    """Log a user out everywhere (their API keys keep working)."""
    with ApiClient.open(conn) as client:
        answer = client.delete(f"{user_path(username)}/sessions")
    count = answer["revoked"]
    click.echo(f"Revoked {count} session{'' if count == 1 else 's'} of {username}.")
