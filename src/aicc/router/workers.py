"""Engine worker processes on this machine (`aicc serve --workers N`): start, watch, restart.

Each worker is `aicc serve --role engine` in a fresh interpreter (fork + exec, never
multiprocessing: see `aicc.engine.grammar.compiler`). The supervisor binds every worker's
listening socket itself (127.0.0.1, a free port) and hands it down, so no other process can
take the port and a worker keeps its URL across restarts. While a worker is down, connections
to its port wait in the socket's backlog for the next one: the router learns of the crash at
once from `on_change` and sends nothing there meanwhile.

A worker reads its settings from a pipe on its stdin and stops when that pipe closes, so none
outlives the gateway, even a gateway killed with SIGKILL. The gateway reaches workers as it
reaches any upstream: `RemoteClient(supervisor.upstream(replica.id))`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import httpx
from fastapi import FastAPI

from aicc.config import Settings
from aicc.errors import AiccError, EngineUnavailableError
from aicc.router.remote import RemoteUpstream
from aicc.router.worker_spec import (
    WORKER_TOKEN_ENV,
    encode_worker_spec,
    is_valid_worker_token,
)
from aicc.store.local import LocalModel, resolve_model

logger = logging.getLogger(__name__)

_WORKER_MAIN = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[2]); "
    "from aicc.cli.engine_role import worker_main; worker_main(int(sys.argv[1]))"
)
_RESTART_MIN_S = 1.0
_STOP_GRACE_S = 10.0
"""Beyond `drain_timeout_s`, before a worker that ignores SIGTERM is killed."""


class WorkerState(StrEnum):
    STARTING = "starting"
    """Started (or restarted); loading its model, not yet ready."""
    READY = "ready"
    """Answered /readyz: may take requests."""
    DOWN = "down"
    """Exited or did not start in time; a restart follows after the backoff."""
    STOPPED = "stopped"
    """Stopped for good (the supervisor closed, or its first start failed)."""


@dataclass(frozen=True, slots=True)
class WorkerReplica:
    """One worker as the router sees it."""

    id: str
    """`worker-<n>`; stays the same across restarts."""
    url: str
    """`http://127.0.0.1:<port>`; stays the same across restarts."""
    pid: int | None
    """The current process (None before the first start)."""
    state: WorkerState
    num_restarts: int

    @property
    def is_ready(self) -> bool:
        return self.state is WorkerState.READY


ChangeCallback = Callable[[WorkerReplica], None]


@dataclass(slots=True, eq=False)
class _Slot:
    id: str
    listener: socket.socket
    url: str
    first_ready: asyncio.Future[None]
    process: subprocess.Popen[bytes] | None = None
    state: WorkerState = WorkerState.STARTING
    num_restarts: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class WorkerSupervisor:
    """Runs `count` engine workers of `model_spec`, each with `threads_per_worker` threads.

    Use it from one event loop: `await start()`, then `replicas()` and `on_change`
    callbacks; `await close()` at the end. A worker that exits is restarted after 1 s, 2 s,
    4 s … up to `settings.worker_restart_max_s`.
    """

    def __init__(
        self,
        settings: Settings,
        model_spec: LocalModel,
        count: int,
        threads_per_worker: int,
        token: str,
        *,
        restart_min_s: float = _RESTART_MIN_S,
    ) -> None:
        """Raises ValueError for a count or thread number below 1, or a token that is not
        32-512 printable ASCII characters."""
        if count < 1 or threads_per_worker < 1 or not is_valid_worker_token(token):
            raise ValueError("need count ≥ 1, threads_per_worker ≥ 1 and a 32+ character token")
        self.settings = settings
        self.model_spec = model_spec
        self.count = count
        self.threads_per_worker = threads_per_worker
        self.restart_min_s = restart_min_s
        self.restart_max_s = max(settings.worker_restart_max_s, restart_min_s)
        self.start_timeout_s = settings.worker_start_timeout_s
        self.stop_timeout_s = settings.drain_timeout_s + _STOP_GRACE_S
        self._token = token
        self._spec = encode_worker_spec(settings, model_spec, threads_per_worker)
        self._slots: list[_Slot] = []
        self._callbacks: list[ChangeCallback] = []

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every worker and wait until all are ready.

        Raises EngineUnavailableError (and stops them all) when a worker cannot be started,
        exits, or is not ready within `worker_start_timeout_s`.
        """
        loop = asyncio.get_running_loop()
        for index in range(self.count):
            listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
            port = listener.getsockname()[1]
            slot = _Slot(f"worker-{index}", listener, f"http://127.0.0.1:{port}",
                         loop.create_future())  # fmt: skip
            self._slots.append(slot)
            slot.task = asyncio.create_task(self._supervise(slot), name=f"aicc-{slot.id}")
        try:
            await asyncio.gather(*(slot.first_ready for slot in self._slots))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop every worker: SIGTERM (it drains), SIGKILL after `drain_timeout_s` + 10 s."""
        tasks = [slot.task for slot in self._slots if slot.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(self._stop(slot) for slot in self._slots))
        for slot in self._slots:
            slot.listener.close()
            if slot.state is not WorkerState.STOPPED:
                self._set(slot, WorkerState.STOPPED)

    # -- what the router reads ---------------------------------------------------------------
    @property
    def token(self) -> str:
        """The bearer token every worker takes."""
        return self._token

    @property
    def num_ready(self) -> int:
        return sum(1 for slot in self._slots if slot.state is WorkerState.READY)

    def replicas(self) -> list[WorkerReplica]:
        return [self._replica(slot) for slot in self._slots]

    def upstream(self, replica_id: str) -> RemoteUpstream:
        """How to reach a worker with `RemoteClient`. Raises KeyError for an unknown id."""
        slot = next((slot for slot in self._slots if slot.id == replica_id), None)
        if slot is None:
            raise KeyError(replica_id)
        timeout_s = self.settings.request_timeout_s
        return RemoteUpstream(
            slot.url, self._token, first_byte_timeout_s=timeout_s, idle_timeout_s=timeout_s,
            total_timeout_s=timeout_s + 5.0,
        )  # fmt: skip

    def on_change(self, callback: ChangeCallback) -> Callable[[], None]:
        """Call `callback` (on the event loop) with a worker each time its state changes;
        returns the function that unsubscribes it."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    # -- supervision -------------------------------------------------------------------------
    async def _supervise(self, slot: _Slot) -> None:
        num_failures = 0
        try:
            while True:
                ready_for_s = await self._run_once(slot)
                ended = _describe_end(slot.process)
                if not slot.first_ready.done():
                    slot.first_ready.set_exception(EngineUnavailableError(
                        f"engine {slot.id} {ended} before it was ready (its log is above)"
                    ))  # fmt: skip
                    self._set(slot, WorkerState.STOPPED)
                    return
                if ready_for_s is not None and ready_for_s >= self.restart_max_s:
                    num_failures = 0  # up long enough: forgive the earlier crashes
                delay_s = restart_delay_s(num_failures, self.restart_min_s, self.restart_max_s)
                num_failures += 1
                logger.warning("engine %s %s; restarting in %g s", slot.id, ended, delay_s)
                await asyncio.sleep(delay_s)
                slot.num_restarts += 1
        finally:
            if not slot.first_ready.done():
                slot.first_ready.set_exception(EngineUnavailableError("the supervisor closed"))

    async def _run_once(self, slot: _Slot) -> float | None:
        """Start the worker and wait until it exits; how long it was ready (None: never)."""
        try:
            process = self._launch(slot)
        except OSError as exc:
            logger.error("cannot start engine %s: %s", slot.id, exc)
            self._set(slot, WorkerState.DOWN)
            return None
        slot.process = process
        self._set(slot, WorkerState.STARTING)
        exited = asyncio.ensure_future(wait_for_exit(process))
        try:
            ready_at = None
            if await self._wait_ready(slot, exited):
                ready_at = time.monotonic()
                self._set(slot, WorkerState.READY)
                if not slot.first_ready.done():
                    slot.first_ready.set_result(None)
            elif not exited.done():
                logger.error(
                    "engine %s was not ready within %g s; killing it", slot.id,
                    self.start_timeout_s,
                )  # fmt: skip
                process.kill()
            await exited
        finally:
            exited.cancel()
        _close_stdin(process)
        self._set(slot, WorkerState.DOWN)
        return time.monotonic() - ready_at if ready_at is not None else None

    def _launch(self, slot: _Slot) -> subprocess.Popen[bytes]:
        fd = slot.listener.fileno()
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_MAIN, str(fd), json.dumps(sys.path)],
            pass_fds=(fd,),
            stdin=subprocess.PIPE,
            env={**os.environ, WORKER_TOKEN_ENV: self._token},
            # Its own session: a Ctrl-C at the terminal reaches the gateway only, which then
            # drains and stops its workers in order.
            start_new_session=True,
        )
        assert process.stdin is not None
        # Far below a pipe's buffer: this never blocks. The pipe stays open (see module doc).
        with contextlib.suppress(BrokenPipeError):  # died at once: the watcher sees it
            process.stdin.write(self._spec)
            process.stdin.flush()
        return process

    async def _wait_ready(self, slot: _Slot, exited: asyncio.Future[int]) -> bool:
        """Poll /readyz until it answers 200 (True), or the worker exits or runs out of time.
        The socket is ours, so a connection waits in the backlog until the worker listens."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        async with httpx.AsyncClient(trust_env=False) as client:
            while not exited.done() and (remaining := deadline - loop.time()) > 0:
                probe = asyncio.ensure_future(client.get(slot.url + "/readyz", timeout=remaining))
                either: set[asyncio.Future[Any]] = {probe, exited}
                await asyncio.wait(either, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if not probe.done():
                    probe.cancel()
                    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                        await probe
                    continue
                with contextlib.suppress(httpx.HTTPError):
                    if probe.result().status_code == 200:
                        return True
                await asyncio.wait({exited}, timeout=0.1)
        return False

    async def _stop(self, slot: _Slot) -> None:
        process = slot.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(self.stop_timeout_s):
                    await wait_for_exit(process)
            except TimeoutError:
                logger.error("engine %s did not stop within %g s; killing it", slot.id,
                             self.stop_timeout_s)  # fmt: skip
                process.kill()
                await wait_for_exit(process)
        _close_stdin(process)

    def _set(self, slot: _Slot, state: WorkerState) -> None:
        slot.state = state
        replica = self._replica(slot)
        for callback in list(self._callbacks):
            try:
                callback(replica)
            except Exception:  # one subscriber's bug must not stop supervision
                logger.exception("a worker state callback failed")

    @staticmethod
    def _replica(slot: _Slot) -> WorkerReplica:
        pid = slot.process.pid if slot.process is not None else None
        return WorkerReplica(slot.id, slot.url, pid, slot.state, slot.num_restarts)


def _describe_end(process: subprocess.Popen[bytes] | None) -> str:
    if process is None or process.returncode is None:
        return "could not be started"
    code = process.returncode
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"(pid {process.pid}) was killed by {signal.Signals(-code).name}"
    return f"(pid {process.pid}) exited with status {code}"


def _close_stdin(process: subprocess.Popen[bytes]) -> None:
    if process.stdin is not None:
        with contextlib.suppress(BrokenPipeError):  # unflushed bytes of a dead worker
            process.stdin.close()


def restart_delay_s(num_failures: int, min_s: float, max_s: float) -> float:
    """The wait before a restart after `num_failures` earlier ones in a row: `min_s`,
    doubling each time, at most `max_s`."""
    return min(min_s * 2.0 ** min(num_failures, 64), max_s)


async def wait_for_exit(process: subprocess.Popen[Any]) -> int:
    """Wait for `process` to exit without blocking the loop or a thread; reap it, return its
    status. Linux: the loop watches a pidfd; elsewhere it polls."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # no pidfd here, or already reaped
        while process.poll() is None:  # noqa: ASYNC110 (nothing to wait on)
            await asyncio.sleep(0.05)
        return process.returncode
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(pidfd, on_exit)
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return process.wait()


@asynccontextmanager
async def running_workers(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """With `settings.workers` > 0: run the supervisor (on `app.state.workers`) for the
    block, `threads` split among the workers; otherwise `app.state.workers` is None.

    Raises what `WorkerSupervisor.start` raises (also set as `app.state.startup_error`),
    and `ModelNotFoundError` for a model that cannot be resolved.
    """
    app.state.workers = None
    if settings.workers == 0:
        yield
        return
    registry = getattr(app.state, "registry", None)
    try:
        model = await asyncio.to_thread(resolve_model, settings.model, settings.model_dir, registry)
        threads = max(1, settings.threads // settings.workers)
        token = secrets.token_urlsafe(32)
        supervisor = WorkerSupervisor(settings, model, settings.workers, threads, token)
        await supervisor.start()
    except AiccError as exc:
        app.state.startup_error = exc
        raise
    app.state.workers = supervisor
    try:
        yield
    finally:
        app.state.workers = None
        await supervisor.close()
