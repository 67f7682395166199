"""`aicc roles ...`: what each role may do and which models it may use (roles:read/write)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from aicc.auth.permissions import Permission
from aicc.cli.client import ApiClient, Connection, connection_options
from aicc.cli.identity import json_option
from aicc.cli.output import echo_fields, echo_json, echo_table, join

_PERMISSION_HELP = "Permission to grant (repeat for more): " + ", ".join(
    p.value for p in Permission
)


def role_path(name: str) -> str:
    return f"/admin/roles/{quote(name, safe='')}"


def echo_role(role: dict[str, Any]) -> None:
    echo_fields(
        [
            ("name", role["name"]),
            ("description", role.get("description") or None),
            ("built-in", "yes" if role["is_builtin"] else "no"),
            ("permissions", join(role["permissions"])),
            ("models", join(role["models"])),
        ]
    )


@click.group()
def roles() -> None:
    """Roles: permissions plus the models they allow."""


@roles.command("list")
@json_option
@connection_options
def roles_list(conn: Connection, as_json: bool) -> None:
    """List built-in and custom roles."""
    with ApiClient.open(conn) as client:
        data = client.get("/admin/roles")["data"]
    if as_json:
        echo_json(data)
        return
    echo_table(
        ("NAME", "BUILT-IN", "PERMISSIONS", "MODELS", "DESCRIPTION"),
        [
            (
                role["name"],
                "yes" if role["is_builtin"] else "no",
                join(role["permissions"]),
                join(role["models"]),
                role.get("description") or "-",
            )
            for role in data
        ],
    )


@roles.command("show")
@click.argument("name")
@json_option
@connection_options
def roles_show(conn: Connection, name: str, as_json: bool) -> None:
    """Show one role."""
    with ApiClient.open(conn) as client:
        role = client.get(role_path(name))
    if as_json:
        echo_json(role)
    else:
        echo_role(role)


@roles.command("create")
@click.argument("name")
@click.option("--permission", "permissions", multiple=True, required=True, help=_PERMISSION_HELP)
@click.option(
    "--model", "models", multiple=True, metavar="PATTERN", help="Model name or glob (repeat)."
)
@click.option("--description", default="", help="What the role is for.")
@connection_options
def roles_create(
    conn: Connection,
    name: str,
    permissions: tuple[str, ...],
    models: tuple[str, ...],
    description: str,
) -> None:
    """Create a custom role."""
    body = {
        "name": name,
        "permissions": list(permissions),
        "models": list(models),
        "description": description,
    }
    with ApiClient.open(conn) as client:
        role = client.post("/admin/roles", body)
    click.echo(f"Created role {role['name']}.")


@roles.command("update")
@click.argument("name")
@click.option("--permission", "permissions", multiple=True, help="Replace the permissions.")
@click.option("--model", "models", multiple=True, metavar="PATTERN", help="Replace the models.")
@click.option("--no-models", is_flag=True, help="Allow no models at all.")
@click.option("--description", help="What the role is for.")
@connection_options
def roles_update(
    conn: Connection,
    name: str,
    permissions: tuple[str, ...],
    models: tuple[str, ...],
    no_models: bool,
    description: str | None,
) -> None:
    """Change a custom role (built-in roles are fixed)."""
    if models and no_models:
        raise click.UsageError("--model and --no-models exclude each other")
    body: dict[str, Any] = {}
    if permissions:
        body["permissions"] = list(permissions)
    if models or no_models:
        body["models"] = list(models)
    if description is not None:
        body["description"] = description
    if not body:
        raise click.UsageError("nothing to change; see `aicc roles update --help`")
    with ApiClient.open(conn) as client:
        role = client.patch(role_path(name), body)
    echo_role(role)


@roles.command("delete")
@click.argument("name")
@connection_options
def roles_delete(conn: Connection, name: str) -> None:
    """Delete a custom role no user holds."""
    with ApiClient.open(conn) as client:
        client.delete(role_path(name))
    click.echo(f"Deleted role {name}.")
