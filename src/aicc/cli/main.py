"""The `aicc` command. Thin: settings in, server or table out."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from aicc import __version__
from aicc.config import Settings, load_settings
from aicc.errors import AiccError, ConfigError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aicc")
def main() -> None:
    """aicc: run open LLMs on your own machines behind an OpenAI-compatible API."""


@main.command()
@click.option(
    "--model", "--model-path", "model", help="Model name (see `aicc models list`) or GGUF path."
)
@click.option("--host", help="Address to bind.  [default: 127.0.0.1]")
@click.option("--port", type=int, help="Port to listen on.  [default: 8080]")
@click.option("--max-batch-size", type=int, help="Sequences decoded together.  [default: 32]")
@click.option("--ctx-size", type=int, help="KV cache size in tokens.  [default: 8192]")
@click.option("--threads", type=int, help="CPU threads for llama.cpp.  [default: all CPUs]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Where to run.  [default: cpu]")
@click.option("--max-queue", type=int, help="Requests that may wait for a slot.  [default: 256]")
@click.option("--served-model-name", help="Name clients put in `model`.")
@click.option(
    "--log-format", type=click.Choice(["json", "text"]), help="Log lines.  [default: json]"
)
@click.option("--metrics-port", type=int, help="Also serve /metrics (no key) on this port.")
@click.option("--database-url", help="State database URL.  [default: SQLite in the state dir]")
@click.option("--state-dir", type=click.Path(path_type=Path), help="Database and secret dir.")
@click.option("--tls-cert", type=click.Path(path_type=Path), help="PEM certificate: serve HTTPS.")
@click.option("--tls-key", type=click.Path(path_type=Path), help="PEM key of --tls-cert.")
@click.option(
    "--tls-client-ca", type=click.Path(path_type=Path), help="Require client certs from this CA."
)
@click.option(
    "--role",
    type=click.Choice(["gateway", "engine"]),
    help="`engine`: engine-only worker on loopback (token in AICC_WORKER_TOKEN).  "
    "[default: gateway]",
)
@click.option("--workers", type=int, help="Engine worker processes (0: in-process).  [default: 0]")
@click.option(
    "--config", "config_file", type=click.Path(path_type=Path), help="YAML settings file."
)
def serve(config_file: Path | None, **flags: Any) -> None:
    """Start the OpenAI-compatible server."""
    from aicc.cli.serve import run_server

    settings = _settings_or_exit(config_file, flags)
    try:
        if settings.role == "engine":
            from aicc.cli.engine_role import run_engine

            run_engine(settings)
        else:
            run_server(settings)
    except AiccError as exc:
        _fail(exc.message)


def _settings_or_exit(config_file: Path | None, flags: dict[str, Any]) -> Settings:
    try:
        return load_settings(config_file, **flags)
    except ConfigError as exc:
        _fail(exc.message)


def _fail(message: str) -> NoReturn:
    click.echo(f"aicc: error: {message}", err=True)
    sys.exit(2)


from aicc.cli.certs import certs  # noqa: E402  (imports nothing from this module)

main.add_command(certs)


from aicc.cli.identity import login, logout, passwd, totp, whoami  # noqa: E402
from aicc.cli.keys import keys  # noqa: E402
from aicc.cli.roles import roles  # noqa: E402
from aicc.cli.users import users  # noqa: E402

main.add_command(login)
main.add_command(logout)
main.add_command(whoami)
main.add_command(passwd)
main.add_command(totp)
main.add_command(users)
main.add_command(keys)
main.add_command(roles)


from aicc.cli.audit import audit  # noqa: E402

main.add_command(audit)


from aicc.cli.models import models  # noqa: E402

main.add_command(models)

from aicc.cli.models_ops import ALL_COMMANDS as MODEL_OPERATIONS  # noqa: E402

for _command in MODEL_OPERATIONS:
    models.add_command(_command)


from aicc.cli.bench import bench  # noqa: E402
from aicc.cli.doctor import doctor  # noqa: E402
from aicc.cli.eval import eval_group  # noqa: E402

main.add_command(bench)
main.add_command(doctor)
main.add_command(eval_group)
from aicc.cli.deploy import deploy  # noqa: E402

main.add_command(deploy)
