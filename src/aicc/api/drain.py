"""Graceful drain. The first SIGTERM/SIGINT turns readiness 503 and answers new requests 503
with `Retry-After` — the listening socket stays open, so clients get that answer rather than a
refused connection — while the requests in flight run to their end. When none is left, or
after `drain_timeout_s`, uvicorn's shutdown runs; the lifespan then closes the audit log, which
flushes it. A second signal ends the drain at once (the audit log is still flushed)."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from types import FrameType

import uvicorn
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from aicc.api.errors import error_body
from aicc.api.record import scope_record

logger = logging.getLogger(__name__)

PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Answered during the drain too: orchestrators must see readiness turn 503."""

_SHUTDOWN_GRACE_S = 2
"""After the drain: time left to answers still being sent (503s, probes), and to requests
cancelled at the drain's end to record themselves (audit entries), before the lifespan ends."""


@dataclass(slots=True)
class DrainState:
    """Shared by the server (which starts the drain) and the middleware (which counts)."""

    retry_after_s: int = 1
    """Sent in `Retry-After` with the 503s of the drain."""
    is_draining: bool = False
    num_in_flight: int = 0
    """Requests admitted and not finished (probes not counted)."""


class DrainMiddleware:
    """Counts the requests in flight; while draining, answers new ones 503 `server_draining`
    (probes excepted) and asks the client to close the connection."""

    def __init__(self, app: ASGIApp, state: DrainState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        state = self.state
        if state.is_draining:
            await _refuse(scope, receive, send, state.retry_after_s)
            return
        state.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.num_in_flight -= 1


async def _refuse(scope: Scope, receive: Receive, send: Send, retry_after_s: int) -> None:
    record = scope_record(scope)
    if record is not None:
        record.error_code = "server_draining"
    message = "The server is shutting down and takes no new requests; retry shortly."
    body = error_body(message, "server_error", code="server_draining")
    headers = {"Retry-After": str(retry_after_s), "Connection": "close"}
    await JSONResponse(body, status_code=503, headers=headers)(scope, receive, send)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain before its shutdown (see the module's docstring).

    Signals are not raised again after the server stops (uvicorn does, which would end the
    process with the signal's status): a drained server exits normally. A third signal, for a
    shutdown that hangs, ends the process the default way.
    """

    def __init__(self, config: uvicorn.Config, state: DrainState, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.drain = state
        self.drain_timeout_s = drain_timeout_s
        self._drain_deadline: float | None = None
        """Event-loop time at which the drain ends; set on the first tick of the drain."""
        self._is_forced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: set flags only; `on_tick` acts on them within 0.1 s.
        if self._is_forced:
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)
        elif not self.started:
            self.should_exit = True  # nothing is in flight yet: uvicorn's plain shutdown
        elif self.drain.is_draining:
            self._is_forced = True
        else:
            self.drain.is_draining = True  # readiness and new requests see it at once

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if not self.drain.is_draining:
            return False
        now = asyncio.get_running_loop().time()
        if self._drain_deadline is None:
            self._drain_deadline = now + self.drain_timeout_s
            logger.info(
                "draining: %d requests in flight; new requests get 503 (for at most %g s)",
                self.drain.num_in_flight,
                self.drain_timeout_s,
            )
        if self.drain.num_in_flight == 0:
            logger.info("drained: no request left in flight")
        elif self._is_forced or now >= self._drain_deadline:
            logger.warning(
                "ending the drain (%s): cancelling %d requests in flight",
                "second signal" if self._is_forced else "drain timeout",
                self.drain.num_in_flight,
            )
            await self._cancel_requests()
        else:
            return False
        self.should_exit = True
        self.config.timeout_graceful_shutdown = _SHUTDOWN_GRACE_S
        return True

    async def _cancel_requests(self) -> None:
        tasks = set(self.server_state.tasks)
        for task in tasks:
            task.cancel()
        if tasks:  # let them unwind: aborted generations, audit entries of the cut calls
            await asyncio.wait(tasks, timeout=_SHUTDOWN_GRACE_S)
