"""The separate metrics port: plain HTTP on `metrics_host:metrics_port`, only `GET /metrics`,
no credential (bind it to an address only the monitoring network reaches).

It runs on the app's event loop, beside the main server, so scrapes read the engine and limiter
from the thread that owns them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Generator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aicc.config import Settings
from aicc.errors import ConfigError
from aicc.observability.metrics import Metrics


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The main server owns SIGINT/SIGTERM; taking them here would stop only this one.
        yield


class MetricsServer:
    """Serves `metrics.render()`; `start()` and `stop()` run on the app's event loop."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.requested_port = port
        self._socket: socket.socket | None = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (differs from the requested one when that was 0)."""
        if self._socket is None:
            raise RuntimeError("the metrics server is not started")
        port: int = self._socket.getsockname()[1]
        return port

    async def start(self) -> None:
        """Bind and serve.

        Raises:
            ConfigError: the address cannot be bound (in use, not local, not permitted).
        """
        # Bind here rather than in uvicorn, which answers a busy port with sys.exit().
        try:
            infos = socket.getaddrinfo(
                self.host, self.requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
            except OSError:
                sock.close()
                raise
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {self.host}:{self.requested_port}: {exc.strerror or exc}"
                "; choose another metrics_port or metrics_host"
            ) from None
        self._socket = sock
        app = Starlette(routes=[Route("/metrics", self._metrics, methods=["GET"])])
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", log_level="warning"
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise ConfigError("the metrics server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop serving and close the port (idempotent)."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        self._server = self._task = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def _metrics(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, headers={"Content-Type": content_type})


async def start_metrics_server(metrics: Metrics, host: str, port: int) -> MetricsServer:
    """Start serving `metrics` on `host:port`; `await server.stop()` at shutdown.

    Raises:
        ConfigError: the address cannot be bound.
    """
    server = MetricsServer(metrics, host, port)
    await server.start()
    return server


@contextlib.asynccontextmanager
async def serving_metrics(metrics: Metrics, settings: Settings) -> AsyncIterator[MetricsServer]:
    """Serve `metrics` on `settings.metrics_host:metrics_port` for the duration of the block.

    Raises:
        ConfigError: no `metrics_port` is set, or the address cannot be bound.
    """
    if settings.metrics_port is None:
        raise ConfigError("serving metrics on a port of their own needs metrics_port")
    server = await start_metrics_server(metrics, settings.metrics_host, settings.metrics_port)
    try:
        yield server
    finally:
        await server.stop()
