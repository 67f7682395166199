"""`aicc serve`: resolve the model, start uvicorn, print how to call the server."""

from __future__ import annotations

import asyncio
import logging

import click
import uvicorn

from aicc.api.app import create_app
from aicc.config import Settings
from aicc.errors import AiccError
from aicc.store.local import BUNDLED_MODEL_NAME, resolve_model


def run_server(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.model == BUNDLED_MODEL_NAME:
        click.echo(f"aicc: preparing the bundled model in {settings.model_dir} ...", err=True)
    model = resolve_model(settings.model, settings.model_dir)
    app = create_app(settings, model)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    try:
        asyncio.run(_serve(server, settings.served_model_name or model.name))
    except SystemExit:  # uvicorn exits when the app's start-up fails
        if app.state.startup_error is None:
            raise
    if not server.started:
        error = app.state.startup_error
        raise error if error is not None else AiccError("the server failed to start")


async def _serve(server: uvicorn.Server, model_name: str) -> None:
    task = asyncio.create_task(server.serve())
    # uvicorn offers no "listening" event; poll its flag (the sockets exist only then).
    while not server.started and not task.done():  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    if server.started:
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        click.echo(_banner(f"http://{host}:{port}", model_name))
    await task


def _banner(url: str, model: str) -> str:
    messages = '[{"role": "user", "content": "Hello!"}]'
    python = (
        f'from openai import OpenAI; c = OpenAI(base_url="{url}/v1", api_key="none"); '
        f'print(c.chat.completions.create(model="{model}", messages={messages}, '
        "max_tokens=64).choices[0].message.content)"
    )
    return (
        f"\naicc is serving {model} at {url}\n\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f"""    -d '{{"model": "{model}", "messages": {messages}, "max_tokens": 64}}'\n\n"""
        f"  python -c '{python}'\n"
    )
