"""`aicc deploy ...`: deployments' variants, weights and replica health; deployments created,
replaced and removed at run time (over the admin API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from aicc.cli.client import ApiClient, CliError, Connection, connection_options
from aicc.cli.deploy_apply import read_deployments
from aicc.cli.identity import json_option
from aicc.cli.output import echo_json, echo_table


def _path(model: str, action: str = "") -> str:
    path = f"/admin/deployments/{quote(model, safe='')}"
    return f"{path}/{action}" if action else path


def _echo_weights(answer: dict[str, Any]) -> None:
    weights = ", ".join(f"{name}={weight:g}" for name, weight in answer["weights"].items())
    click.echo(f"{answer['model']}: {weights}")


@click.group()
def deploy() -> None:
    """Deployments: weighted variants of a model (A/B tests, canaries) and their replicas."""


@deploy.command("list")
@json_option
@connection_options
def deploy_list(conn: Connection, as_json: bool) -> None:
    """List deployments, their variants' weights and their replicas' health."""
    with ApiClient.open(conn) as client:
        data = client.get("/admin/deployments")["data"]
    if as_json:
        echo_json(data)
        return
    rows = []
    for deployment in data:
        groups = [(v["name"], f"{v['weight']:g}", v["replicas"]) for v in deployment["variants"]]
        if deployment["fallback"]:
            groups.append(("(fallback)", "-", deployment["fallback"]))
        for variant, weight, replicas in groups:
            for replica in replicas:
                state = "up" if replica["available"] else "ejected"
                busy = f"{replica['outstanding']}/{replica['max_inflight']}"
                rows.append((deployment["model"], variant, weight, replica["id"], state, busy))
    echo_table(("MODEL", "VARIANT", "WEIGHT", "REPLICA", "STATE", "IN FLIGHT"), rows)


@deploy.command("promote")
@click.argument("model")
@click.argument("variant")
@connection_options
def deploy_promote(conn: Connection, model: str, variant: str) -> None:
    """Send all of MODEL's traffic to VARIANT."""
    with ApiClient.open(conn) as client:
        _echo_weights(client.post(_path(model, "promote"), {"variant": variant}))


@deploy.command("rollback")
@click.argument("model")
@click.argument("variant", required=False)
@connection_options
def deploy_rollback(conn: Connection, model: str, variant: str | None) -> None:
    """Send all of MODEL's traffic back to VARIANT (default: its baseline)."""
    body = {"variant": variant} if variant else {}
    with ApiClient.open(conn) as client:
        _echo_weights(client.post(_path(model, "rollback"), body))


@deploy.command("weights")
@click.argument("model")
@click.argument("weights", nargs=-1, required=True)
@connection_options
def deploy_weights(conn: Connection, model: str, weights: tuple[str, ...]) -> None:
    """Set MODEL's variant weights: `aicc deploy weights chat v1=90 v2=10`."""
    parsed: dict[str, float] = {}
    for item in weights:
        name, sep, value = item.partition("=")
        try:
            parsed[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise CliError(f"weights are NAME=NUMBER, like v1=90; got {item!r}")
    with ApiClient.open(conn) as client:
        _echo_weights(client.post(_path(model, "weights"), {"weights": parsed}))


@deploy.command("feedback")
@click.argument("model")
@click.option("--since", help="Only ratings given since this time (ISO-8601; UTC if no zone).")
@json_option
@connection_options
def deploy_feedback(conn: Connection, model: str, since: str | None, as_json: bool) -> None:
    """Users' ratings of MODEL's calls per variant (`POST /v1/feedback`), for A/B tests."""
    with ApiClient.open(conn) as client:
        data = client.get(_path(model, "feedback"), {"since": since} if since else None)["data"]
    if as_json:
        echo_json(data)
        return
    rows = [
        (v["variant"] or "-", str(v["positive"]), str(v["negative"]), str(v["total"]),
         "-" if v["positive_ratio"] is None else f"{v['positive_ratio']:.1%}")
        for v in data
    ]  # fmt: skip
    echo_table(("VARIANT", "POSITIVE", "NEGATIVE", "TOTAL", "POSITIVE %"), rows)


@deploy.command("apply")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@connection_options
def deploy_apply(conn: Connection, file: Path) -> None:
    """Create or replace the deployments in FILE (YAML or JSON: one, or a list).

    A replica's key comes from `api_key_env: NAME`, read from this shell's environment and
    stored encrypted by the server. Deployments of the server's config file stay read-only.
    """
    deployments = read_deployments(file)
    with ApiClient.open(conn) as client:
        for deployment in deployments:
            model = deployment["model"]
            body = {k: v for k, v in deployment.items() if k != "model"}
            answer = client.request("PUT", _path(model), body=body)
            weights = ", ".join(f"{v['name']}={v['weight']:g}" for v in answer["variants"])
            click.echo(f"{model}: applied ({weights})")


@deploy.command("rm")
@click.argument("model")
@connection_options
def deploy_rm(conn: Connection, model: str) -> None:
    """Remove deployment MODEL (one made through the API); requests on it finish first."""
    with ApiClient.open(conn) as client:
        client.delete(_path(model))
    click.echo(f"{model}: removed")
