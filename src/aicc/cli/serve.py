"""`aicc serve`: start uvicorn on the app (which resolves and loads the model), print how to
call the server."""

from __future__ import annotations

import asyncio

import click
import uvicorn
from fastapi import FastAPI

from aicc.api.app import create_app
from aicc.api.drain import DrainingServer
from aicc.api.models import ModelPool
from aicc.config import Settings
from aicc.errors import AiccError
from aicc.observability.logging import configure_logging, uvicorn_logging_options
from aicc.store.local import BUNDLED_MODEL_NAME, resolve_model
from aicc.tls import uvicorn_config


def run_server(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format)
    if settings.model == BUNDLED_MODEL_NAME:
        click.echo(f"aicc: preparing the bundled model in {settings.model_dir} ...", err=True)
    # Here first, so that a wrong name fails before anything starts; a registered model
    # (`name[:tag]`) is then resolved again at start-up through the registry, whose record
    # (files, encryption) is authoritative.
    resolved = resolve_model(settings.model, settings.model_dir)
    model = None if resolved.files else resolved
    app = create_app(settings, model, on_bootstrap_key=_show_bootstrap_key)
    # Our logging, not uvicorn's (its config would replace our handlers and log access twice).
    config = uvicorn_config(
        app,
        settings,
        timeout_graceful_shutdown=settings.drain_timeout_s,
        **uvicorn_logging_options(),
    )
    # The drain (SIGTERM) ends by itself; uvicorn's own grace applies to other shutdowns.
    server = DrainingServer(config, app.state.drain, settings.drain_timeout_s)
    try:
        scheme = "https" if settings.tls_cert is not None else "http"
        # uvicorn's loop (uvloop when installed): socket writes and timers in C, not Python.
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(_serve(server, app, scheme))
    except SystemExit:  # uvicorn exits when the app's start-up fails
        if app.state.startup_error is None:
            raise
    if not server.started:
        error = app.state.startup_error
        raise error if error is not None else AiccError("the server failed to start")


def _show_bootstrap_key(key: str) -> None:
    # Straight to the terminal, never through logging: this is the only time it is shown.
    click.echo(
        "\naicc: created the first user, 'admin' (roles admin, security). Its API key is shown "
        f"only now; store it safely:\n\n  {key}\n",
        err=True,
    )


async def _serve(server: uvicorn.Server, app: FastAPI, scheme: str) -> None:
    task = asyncio.create_task(server.serve())
    # uvicorn offers no "listening" event; poll its flag (the sockets exist only then).
    while not server.started and not task.done():  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    pool: ModelPool | None = app.state.pool
    if server.started and pool is not None:
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        click.echo(_banner(f"{scheme}://{host}:{port}", pool.default.name))
    await task


def _banner(url: str, model: str) -> str:
    messages = '[{"role": "user", "content": "Hello!"}]'
    python = (
        "import os; from openai import OpenAI; "
        f'c = OpenAI(base_url="{url}/v1", api_key=os.environ["AICC_API_KEY"]); '
        f'print(c.chat.completions.create(model="{model}", messages={messages}, '
        "max_tokens=64).choices[0].message.content)"
    )
    return (
        f"\naicc is serving {model} at {url}\n"
        "(set AICC_API_KEY to your key: the admin key printed at first start, or one from "
        "`aicc keys create`)\n\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        '    -H "Authorization: Bearer $AICC_API_KEY" \\\n'
        f"""    -d '{{"model": "{model}", "messages": {messages}, "max_tokens": 64}}'\n\n"""
        f"  python -c '{python}'\n"
    )
