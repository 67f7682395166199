"""`aicc certs`: a private CA and certificates for HTTPS and mTLS without a PKI of one's own."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from aicc.config import load_settings
from aicc.errors import AiccError
from aicc.tls import DEFAULT_DAYS, MAX_DAYS, init_certs


@click.group()
def certs() -> None:
    """TLS certificates for `aicc serve`."""


@certs.command("init")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to write them.  [default: <state_dir>/tls]",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="DNS name or IP clients use to reach the server (repeatable; localhost, 127.0.0.1 "
    "and ::1 are always included).",
)
@click.option(
    "--days",
    type=click.IntRange(1, MAX_DAYS),
    default=DEFAULT_DAYS,
    show_default=True,
    help="Validity of the certificates.",
)
@click.option(
    "--client",
    "client_names",
    multiple=True,
    help="Also issue a client certificate (mTLS) with this name (repeatable).",
)
@click.option("--force", is_flag=True, help="Overwrite certificates and keys that exist.")
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), help="YAML settings file."
)
def certs_init(
    directory: Path | None,
    hosts: tuple[str, ...],
    days: int,
    client_names: tuple[str, ...],
    force: bool,
    config_file: Path | None,
) -> None:
    """Create a private CA, a server certificate it signs and, optionally, client ones."""
    try:
        if directory is None:
            directory = load_settings(config_file).state_dir / "tls"
        paths = init_certs(
            directory, hosts=list(hosts), days=days, client_names=list(client_names), force=force
        )
    except AiccError as exc:
        click.echo(f"aicc: error: {exc.message}", err=True)
        sys.exit(2)
    click.echo(f"CA certificate:     {paths.ca_cert}   (give to clients)")
    click.echo(f"CA key:             {paths.ca_key}   (keep private; offline once done)")
    click.echo(f"server certificate: {paths.server_cert}")
    click.echo(f"server key:         {paths.server_key}")
    for client in paths.clients:
        click.echo(f"client {client.name}: {client.cert}  key: {client.key}")
    serve = f"aicc serve --tls-cert {paths.server_cert} --tls-key {paths.server_key}"
    if paths.clients:
        serve += f" --tls-client-ca {paths.ca_cert}"
    click.echo(f"\nStart the server with HTTPS (TLS 1.3 only):\n\n  {serve}\n")
    click.echo(f"Clients verify it with the CA, e.g.  curl --cacert {paths.ca_cert} https://…")
