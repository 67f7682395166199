"""A bounded pool of warm worker processes that compile JSON Schemas into GBNF on a deadline."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from aicc.engine.grammar.limits import GrammarLimits
from aicc.engine.grammar.schema import normalize_schema
from aicc.engine.grammar.worker import CompileJob, Reply
from aicc.errors import EngineUnavailableError, InvalidRequestError

# A fresh interpreter (fork + exec, never a bare fork: the parent runs threads whose locks a
# forked copy could inherit held). Not multiprocessing's "spawn" start method: that re-runs the
# parent's __main__ module in every worker, which for `aicc serve` imports the whole server,
# llama_cpp included. multiprocessing's Connection still frames and pickles the messages.
_WORKER_MAIN = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[2]); "
    "from aicc.engine.grammar.worker import serve_fd; serve_fd(int(sys.argv[1]))"
)


class _Worker:
    """One worker process and its socket. Its methods block: call them off the event loop."""

    def __init__(self, start_timeout_s: float) -> None:
        parent_socket, child_socket = socket.socketpair()
        with parent_socket, child_socket:
            fd = child_socket.fileno()
            try:
                self.process = subprocess.Popen(
                    [sys.executable, "-c", _WORKER_MAIN, str(fd), json.dumps(sys.path)],
                    pass_fds=(fd,),
                    stdin=subprocess.DEVNULL,
                )
            except OSError as exc:
                raise EngineUnavailableError(f"cannot start the grammar worker: {exc}") from exc
            self.conn = Connection(parent_socket.detach())
        try:
            if not self.conn.poll(start_timeout_s):
                raise TimeoutError(f"no answer within {start_timeout_s}s")
            self.conn.recv()
        except (OSError, EOFError, TimeoutError) as exc:
            self.stop()
            raise EngineUnavailableError(f"the grammar worker did not start: {exc}") from exc

    def run(self, job: CompileJob, timeout_s: float) -> Reply:
        """Send one job and wait for its reply; on any failure the process is killed and reaped.

        Raises:
            InvalidRequestError: no reply within `timeout_s`, or the process died.
        """
        try:
            self.conn.send(job)
            if not self.conn.poll(timeout_s):
                raise InvalidRequestError(
                    f"compiling the schema into a grammar took longer than {timeout_s:g}s; "
                    "simplify the schema", param=job.param,
                )  # fmt: skip
            reply: Reply = self.conn.recv()
            return reply
        except (EOFError, OSError) as exc:
            self.stop()
            raise InvalidRequestError(
                f"the grammar worker died compiling this schema (exit code "
                f"{self.process.returncode})", param=job.param,
            ) from exc  # fmt: skip
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.conn.close()


def _call(
    worker: _Worker | None, job: CompileJob, timeout_s: float, start_timeout_s: float
) -> tuple[_Worker, Reply]:
    """Thread body: start a worker if there is no idle one, then run the job on it."""
    worker = worker or _Worker(start_timeout_s)
    return worker, worker.run(job, timeout_s)


def _stop_abandoned(call: Future[tuple[_Worker, Reply]]) -> None:
    """The request went away while its thread held a worker: stop that worker when it ends."""
    if not call.cancelled() and call.exception() is None:
        call.result()[0].stop()


class GrammarCompiler:
    """Compiles JSON Schemas to GBNF in up to `max_workers` warm processes; call `close()`.

    Use it from one event loop. The cheap checks run in-process first, so a schema that breaks
    a limit never reaches a worker. A conversion past its deadline has its process killed; a new
    one is started on the next request.
    """

    def __init__(self, *, max_workers: int = 2, start_timeout_s: float = 60.0) -> None:
        self._start_timeout_s = start_timeout_s
        self._slots = asyncio.Semaphore(max_workers)
        # Pipe waits block, so they run here; the event loop only awaits their futures.
        self._threads = ThreadPoolExecutor(max_workers, thread_name_prefix="aicc-grammar")
        self._idle: list[_Worker] = []
        self._is_closed = False

    async def compile(
        self,
        schema: dict[str, Any] | None,
        limits: GrammarLimits,
        *,
        param: str = "response_format",
        prefix: str = "",
        suffix: str = "",
        min_count: int = 1,
        max_count: int = 1,
        separator: str = "",
        lenient: bool = False,
    ) -> str:
        """GBNF (start rule `root`) for `prefix JSON suffix`, repeated `min_count..max_count`
        times with `separator` in between. `schema=None` allows any JSON object.

        `lenient=True` drops the constraints on values that a grammar cannot enforce (number
        bounds other than integer ones, `multipleOf`, unknown string formats, `minProperties`,
        `uniqueItems`, ...) instead of refusing them: the output still has the schema's shape
        and types, but those bounds are not guaranteed. Meant for tool parameters, whose
        schemas are written for validators.

        Raises:
            InvalidRequestError: the schema breaks a limit, uses a feature a grammar cannot
                enforce (lenient: a structural one), or takes longer than
                `limits.compile_timeout_s` to compile.
            EngineUnavailableError: the compiler is closed or a worker could not start.
        """
        if not 0 <= min_count <= max_count or not 1 <= max_count <= limits.max_repetition:
            raise InvalidRequestError(
                f"repeat counts {min_count}..{max_count} must satisfy 0 <= min <= max and "
                f"1 <= max <= {limits.max_repetition}", param=param,
            )  # fmt: skip
        normalized = normalize_schema(schema, limits, param=param, lenient=lenient)
        job = CompileJob(
            normalized.root, normalized.refs, limits, param, prefix, suffix, separator,
            min_count, max_count,
        )  # fmt: skip
        async with self._slots:
            if self._is_closed:
                raise EngineUnavailableError("the grammar compiler is closed")
            idle = self._idle.pop() if self._idle else None
            call = self._threads.submit(
                _call, idle, job, limits.compile_timeout_s, self._start_timeout_s
            )
            try:
                worker, (status, text) = await asyncio.wrap_future(call)
            except asyncio.CancelledError:
                if not call.cancelled():
                    call.add_done_callback(_stop_abandoned)
                elif idle is not None:  # the thread never started; its worker is untouched
                    self._idle.append(idle)
                raise
            if self._is_closed:
                worker.stop()
            else:
                self._idle.append(worker)
        if status != "ok":
            raise InvalidRequestError(text, param=param)
        return text

    def close(self) -> None:
        """Stop the idle workers now; a busy one is stopped when its job ends."""
        self._is_closed = True
        while self._idle:
            self._idle.pop().stop()
        self._threads.shutdown(wait=False)
