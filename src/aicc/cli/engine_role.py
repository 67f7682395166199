"""`aicc serve --role engine`: an engine-only worker for a gateway on this machine.

Started by hand (`AICC_WORKER_TOKEN=… aicc serve --role engine --port 9001`) it binds
`host:port`, which must be a loopback address. Started by the gateway's `WorkerSupervisor`
(`worker_main`) it serves a listening socket the gateway bound — so its address outlives
restarts —, reads its settings from stdin, and stops when stdin closes (the gateway is gone).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import sys
import threading

import uvicorn
from fastapi import FastAPI

from aicc.api.drain import DrainingServer
from aicc.config import Settings
from aicc.errors import AiccError, ConfigError
from aicc.observability.logging import configure_logging, uvicorn_logging_options
from aicc.router.worker_app import create_worker_app
from aicc.router.worker_spec import WORKER_TOKEN_ENV, decode_worker_spec, is_valid_worker_token
from aicc.store.local import BUNDLED_MODEL_NAME, ensure_bundled
from aicc.tls import uvicorn_config

logger = logging.getLogger(__name__)

_STDIN_FD = 0


def run_engine(settings: Settings) -> None:
    """Serve the engine-only API on settings.host:port until SIGTERM or Ctrl-C.

    Raises ConfigError for a non-loopback host or a missing or weak token, and the model's
    errors when it cannot be loaded.
    """
    check_loopback(settings.host)
    token = worker_token()
    configure_logging(settings.log_level, settings.log_format)
    model = ensure_bundled(settings.model_dir) if settings.model == BUNDLED_MODEL_NAME else None
    _serve(create_worker_app(settings, model, token), settings, sockets=None, parent_fd=None)


def worker_main(listen_fd: int) -> None:
    """A supervised worker process: settings (one JSON line) from stdin, the token from the
    environment, the listening socket from `listen_fd`. Exits with status 2 on an error."""
    try:
        settings, model = decode_worker_spec(_read_line(_STDIN_FD))
        token = worker_token()
        configure_logging(settings.log_level, settings.log_format)
        listener = socket.socket(fileno=listen_fd)
        app = create_worker_app(settings, model, token)
        _serve(app, settings, sockets=[listener], parent_fd=_STDIN_FD)
    except AiccError as exc:
        print(f"aicc engine worker {os.getpid()}: error: {exc.message}", file=sys.stderr)
        sys.exit(2)


def check_loopback(host: str) -> None:
    """Raise ConfigError unless `host` is a loopback address (or `localhost`)."""
    if host == "localhost":
        return
    try:
        is_loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        is_loopback = False
    if not is_loopback:
        raise ConfigError(
            f"role engine binds to loopback only (127.0.0.1, ::1 or localhost), not "
            f"host={host}: a worker has no users, audit or quotas of its own; serve "
            "other machines through a gateway (`aicc serve`)"
        )


def worker_token() -> str:
    """The bearer token callers must present, from `AICC_WORKER_TOKEN`.

    Raises ConfigError when it is unset or not 32-512 printable ASCII characters.
    """
    token = os.environ.get(WORKER_TOKEN_ENV, "")
    if not is_valid_worker_token(token):
        raise ConfigError(
            f"role engine needs {WORKER_TOKEN_ENV}: the gateway's bearer token, 32 to 512 "
            "printable ASCII characters without spaces (e.g. `openssl rand -hex 32`)"
        )
    return token


def _serve(
    app: FastAPI,
    settings: Settings,
    *,
    sockets: list[socket.socket] | None,
    parent_fd: int | None,
) -> None:
    """Run uvicorn until it stops; with `parent_fd`, also stop once that pipe ends.

    Raises the app's start-up error (the model could not be loaded).
    """
    config = uvicorn_config(
        app,
        settings,
        timeout_graceful_shutdown=settings.drain_timeout_s,
        **uvicorn_logging_options(),
    )
    server = DrainingServer(config, app.state.drain, settings.drain_timeout_s)
    if parent_fd is not None:
        watcher = threading.Thread(
            target=_stop_at_eof, args=(parent_fd, server), name="aicc-parent-watch", daemon=True
        )
        watcher.start()
    try:
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(server.serve(sockets=sockets))
    except SystemExit:  # uvicorn exits when the app's start-up fails
        if app.state.startup_error is None:
            raise
    if not server.started:
        error = app.state.startup_error
        raise error if error is not None else AiccError("the engine worker failed to start")


def _read_line(fd: int) -> bytes:
    """One line from `fd`, unbuffered: the rest of the pipe is left to `_stop_at_eof`."""
    line = bytearray()
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        line += chunk
    return bytes(line)


def _stop_at_eof(fd: int, server: uvicorn.Server) -> None:
    # The gateway never writes after the settings line; EOF means it closed the pipe or died
    # (even by SIGKILL), and a worker must not outlive it. A raw read: a daemon thread blocked
    # inside a buffered reader would abort the interpreter's shutdown.
    while os.read(fd, 4096):
        pass
    logger.info("the gateway closed the worker's pipe; stopping")
    server.should_exit = True
