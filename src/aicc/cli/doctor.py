"""`aicc doctor`: check this machine, the settings, the state they point at and, with
`--server`, a running server. Exit status 1 when any check fails."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from aicc.cli.credentials import normalize_server
from aicc.cli.output import echo_json, is_terminal
from aicc.doctor import DoctorOptions, run_doctor
from aicc.doctor.report import exit_code, render_text, to_json
from aicc.doctor.server import ServerTarget


def _server_url(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    return normalize_server(value) if value else None


@click.command()
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), help="YAML settings file."
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option(
    "--server",
    metavar="URL",
    callback=_server_url,
    help="Also check this running server (readiness, metrics, a one-token completion).",
)
@click.option(
    "--api-key",
    envvar="AICC_API_KEY",
    show_envvar=True,
    metavar="KEY",
    help="Key for --server's completion and metrics (metrics need metrics:read).",
)
@click.option(
    "--cacert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA certificate (PEM) that signed --server's certificate.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(0.1, 600),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the server or the database.",
)
def doctor(
    config_file: Path | None,
    as_json: bool,
    server: str | None,
    api_key: str | None,
    cacert: Path | None,
    timeout_s: float,
) -> None:
    """Check that aicc can run here, and why a running server misbehaves."""
    target = None
    if server is not None:
        key = api_key.strip() if api_key and api_key.strip() else None
        target = ServerTarget(server, api_key=key, cacert=cacert, timeout_s=timeout_s)
    results = run_doctor(DoctorOptions(config_file, server=target, timeout_s=timeout_s))
    if as_json:
        echo_json(to_json(results))
    else:
        click.echo(render_text(results, aligned=is_terminal()))
    sys.exit(exit_code(results))
