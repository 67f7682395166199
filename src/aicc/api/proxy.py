"""A deployment's call: the variant header, the call record, and the remote replicas' proxy.

A remote replica gets the body with `model` rewritten to its own name; its answer comes back
under the public name (a stream event by event, otherwise unchanged). What the
gateway measures on the way (tokens, token times, finish reason) fills the call record and the
caller's quota, as for local calls. A request that reached no client byte yet is retried once
on another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from aicc.api.access import InferenceCaller
from aicc.api.disconnect import ClientDisconnected, unless_gone, until_disconnected
from aicc.api.errors import error_body, error_response
from aicc.api.record import RECORD_FINAL, CallRecord
from aicc.api.sse import DONE, encode_event
from aicc.errors import AiccError
from aicc.router.policy import ReplicaLease, VariantSpec
from aicc.router.service import TENANT_HEADER, VARIANT_HEADER, Replica, RouteDecision, Router
from aicc.router.sse import StreamFacts
from aicc.router.upstream import UpstreamError, UpstreamResponse, upstream_error

Json = dict[str, Any]
Relayed = Literal["more", "final", "last"]
MAX_TRIES = 2
"""Replicas one call may try: a request that reached no client byte is retried once."""


class RoutedCall:
    """One request to a deployment: its variant, the replica it is on, the replicas tried."""

    def __init__(
        self, router: Router, model: str, variant: VariantSpec, record: CallRecord | None
    ) -> None:
        self.router = router
        self.model = model
        self.variant = variant
        self.record = record
        self.replica: Replica | None = None
        self.tried: list[str] = []

    @property
    def decision(self) -> RouteDecision:
        assert self.replica is not None
        return RouteDecision(self.model, self.variant.name, self.replica)

    def pick(self) -> Replica:
        """The next replica (never one tried). Raises `ReplicasBusyError`, `NoReplicaError`."""
        replica = self.router.choose_replica(self.model, self.variant, exclude=self.tried)
        self.replica = replica
        self.tried.append(replica.id)
        if self.record is not None:
            detail = self.record.detail or {}
            self.record.detail = {**detail, "variant": self.variant.name, "replica": replica.id}
        return replica

    def tag(self, response: Response) -> Response:
        response.headers[VARIANT_HEADER] = self.variant.name
        return response

    def error(self, exc: AiccError) -> Response:
        """The OpenAI-style error response, with `Retry-After` where it has one."""
        if self.record is not None:
            self.record.error_code = exc.code or exc.error_type
            if self.record.detail is None:
                self.record.detail = {"variant": self.variant.name}
        response = error_response(exc)
        retry_after = getattr(exc, "retry_after_s", None)
        if isinstance(retry_after, int):
            response.headers["Retry-After"] = str(retry_after)
        return self.tag(response)

    async def run_local(
        self, work: Awaitable[Response], retry: Callable[[], Awaitable[Response]]
    ) -> Response:
        """A local replica's response, tagged; its errors answered here so they are too.

        An engine that is down (503) or full (429) before answering is the replica's fault:
        a down one counts toward its ejection, and the call is retried once through
        `retry` on another replica — a remote one (the variant's, else the fallback)."""
        started = time.perf_counter()
        try:
            response = await work
        except AiccError as exc:
            is_down = exc.status_code == 503
            self.router.record(
                self.decision, ok=exc.status_code < 500, latency_s=0.0, replica_failed=is_down
            )
            if exc.status_code in (429, 503) and len(self.tried) == 1:
                try:
                    replica = self.pick()
                except AiccError:
                    return self.error(exc)
                if replica.client is not None:
                    return await retry()
            return self.error(exc)
        self.router.record(self.decision, ok=True, latency_s=time.perf_counter() - started)
        return self.tag(response)


async def renamed(chunks: AsyncIterator[list[Json]], model: str) -> AsyncGenerator[list[Json]]:
    """Chunks of a local replica under the deployment's public name."""
    try:
        async for ready in chunks:
            for chunk in ready:
                if "model" in chunk:
                    chunk["model"] = model
            yield ready
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


async def forward(
    request: Request, caller: InferenceCaller, call: RoutedCall, path: str
) -> Response:
    """Send the call to its remote replica (once more to another one while nothing reached
    the client) and answer the client. Errors become tagged error responses."""
    body: Json = await request.json()  # parsed once per request (starlette keeps it)
    error: UpstreamError | None = None
    for attempt in range(2):
        if attempt:
            if len(call.tried) >= MAX_TRIES:
                break
            try:
                call.pick()
            except AiccError:
                break
        replica = call.replica
        if replica is None or replica.client is None:
            break  # a local replica cannot take a retry here
        lease = call.router.acquire(replica)
        exchange = _Exchange(call, caller, lease)
        try:
            work = exchange.send(replica, path, body)
            down = call.router.down_signal(replica.id)
            if down is not None:
                work = exchange.unless_down(work, down)
            return await until_disconnected(request, work)
        except UpstreamError as exc:
            exchange.finish(ok=False, replica_failed=True)
            if not exc.retryable:
                return call.error(exc)
            error = exc
        except ClientDisconnected:
            exchange.finish(ok=True, replica_failed=False)  # the client's choice, no error
            raise
        except BaseException:
            exchange.finish(ok=False, replica_failed=False)
            raise
    assert error is not None
    return call.error(error)


class _Exchange:
    """One attempt on one replica: fills the record once it ends, exactly once."""

    def __init__(self, call: RoutedCall, caller: InferenceCaller, lease: ReplicaLease) -> None:
        self.call = call
        self.caller = caller
        self.lease = lease
        self.started = time.perf_counter()
        self.answer: UpstreamResponse | None = None
        self.is_recorded = False
        """The record was filled when the upstream's usage came (what follows is not the
        call's: the client's stream ended there)."""
        self._is_finished = False

    async def send(self, replica: Replica, path: str, body: Json) -> Response:
        assert replica.client is not None
        headers = {}
        if self.caller.record is not None:
            headers["x-request-id"] = self.caller.record.request_id
        if replica.sets_tenant:  # ours, never the client's
            headers[TENANT_HEADER] = self.caller.principal.tenant
        payload = {**body, "model": replica.upstream_model}
        answer = self.answer = await replica.client.open(path, payload, headers=headers)
        if not answer.is_stream:
            data = await answer.json()
            if answer.status >= 400:  # the client's mistake, passed on as it is
                self.finish(ok=True, replica_failed=False, observe=False)
                passed = {k: v for k, v in answer.headers.items() if k != "content-type"}
                return self.call.tag(JSONResponse(data, answer.status, headers=passed))
            if "model" in data:
                data["model"] = self.call.model
            self.finish(ok=True, replica_failed=False)
            return self.call.tag(JSONResponse(data))
        batches = answer.event_batches()
        first = await anext(batches)  # UpstreamError here: nothing sent, may retry
        rename = model_renamer(replica.upstream_model, self.call.model)
        return self.call.tag(PassthroughResponse(self._relay(first, batches, rename)))

    async def unless_down(
        self, work: Coroutine[Any, Any, Response], down: asyncio.Event
    ) -> Response:
        """`work`, unless the replica (an engine worker) goes down before its answer began:
        then a retryable `UpstreamError`."""
        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(down.wait())
        try:
            await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if not task.cancelled():
            return task.result()
        if self.answer is not None:
            await self.answer.aclose()
        replica = self.call.replica
        assert replica is not None
        assert replica.client is not None
        raise upstream_error(
            replica.client.upstream, "closed", "exited before answering", retryable=True
        )

    async def _relay(
        self,
        first: list[bytes],
        batches: AsyncGenerator[list[bytes]],
        rename: Callable[[bytes], bytes],
    ) -> AsyncGenerator[tuple[bytes, Relayed]]:
        """(events, state) pairs, the events of one upstream read together; a failure
        mid-stream ends in an error event and [DONE]. The state is "final" once, when the
        upstream's usage has come (the record is then complete), "last" with [DONE].

        The usage-only chunk is OpenAI's last before [DONE]: the client's stream ends with
        our own [DONE] right after it, without waiting for the upstream's (an aicc upstream
        sends its own once its audit entry is committed, which the gateway's commit runs
        alongside). The upstream's stream is then read to its end after the client's, so
        that its connection is kept; what comes after the usage is not passed on, and an
        upstream that fails there counts against its replica as any failure does."""
        ok = failed = False
        answer = self.answer
        assert answer is not None
        is_ended = False
        """Our [DONE] went out after the usage chunk; the upstream's end is still to read."""

        def state() -> Relayed:
            if answer.facts.is_done:
                return "last"
            if answer.facts.has_final_usage and not self.is_recorded:
                self.is_recorded = True
                if self.call.record is not None:
                    _fill_record(answer.facts, self.call.record)
                return "final"
            return "more"

        try:
            relayed = state()
            yield b"".join(map(rename, first)), relayed
            while relayed == "more" and (batch := await anext(batches, None)) is not None:
                relayed = state()
                yield b"".join(map(rename, batch)), relayed
            if relayed == "final":
                is_ended = True
                yield DONE, "last"
            ok = True
        except UpstreamError as exc:
            failed = True
            if self.call.record is not None:
                self.call.record.error_code = exc.code
            yield encode_event(error_body(exc.message, exc.error_type, code=exc.code)), "more"
            yield DONE, "last"
        finally:
            try:
                if is_ended:
                    ok, failed = await _read_to_end(batches)
            finally:
                await batches.aclose()
                self.finish(ok=ok, replica_failed=failed)

    def finish(self, *, ok: bool, replica_failed: bool, observe: bool = True) -> None:
        if self._is_finished:
            return
        self._is_finished = True
        self.lease.release()
        latency_s = time.perf_counter() - self.started
        router = self.call.router
        if observe:
            router.record(
                self.call.decision, ok=ok, latency_s=latency_s, replica_failed=replica_failed
            )
        answer = self.answer
        if answer is not None:
            _meter(answer, self.caller, fill_record=not self.is_recorded)


async def _read_to_end(batches: AsyncGenerator[list[bytes]]) -> tuple[bool, bool]:
    """(ok, replica failed) of the rest of an upstream stream whose client has its end: read
    to [DONE] within the upstream's timeouts and dropped."""
    try:
        async for _ in batches:
            pass
    except UpstreamError:
        return False, True
    return True, False


def model_renamer(upstream: str, public: str) -> Callable[[bytes], bytes]:
    """What puts an event of `upstream`'s stream under the `public` name: its first
    `"model": "<upstream>"` member (the only one an OpenAI chunk has) is rewritten; the rest
    of the event's bytes pass unchanged."""
    if upstream == public:
        return _unchanged
    name = re.compile(rb'("model"\s*:\s*)' + re.escape(json.dumps(upstream).encode()))
    replacement = json.dumps(public).encode()

    def rename(event: bytes) -> bytes:
        return name.sub(lambda match: match.group(1) + replacement, event, count=1)

    return rename


def _unchanged(event: bytes) -> bytes:
    return event


def _meter(answer: UpstreamResponse, caller: InferenceCaller, *, fill_record: bool) -> None:
    """What the upstream reported, into the caller's quota (and the record)."""
    facts = answer.facts
    prompt, completion = facts.num_prompt_tokens, facts.num_completion_tokens
    if prompt is not None or completion is not None:
        caller.usage.record(prompt or 0, completion or 0)
    if fill_record and caller.record is not None:
        _fill_record(facts, caller.record)


def _fill_record(facts: StreamFacts, record: CallRecord) -> None:
    prompt, completion = facts.num_prompt_tokens, facts.num_completion_tokens
    record.num_prompt_tokens = prompt
    record.num_completion_tokens = completion
    record.first_token_at = facts.first_token_at
    record.last_token_at = facts.last_token_at
    record.finish_reason = facts.finish_reason
    if facts.error_code is not None:
        record.error_code = facts.error_code


class PassthroughResponse(StreamingResponse):
    """An upstream's event stream, passed on. Its last event goes out as the final body
    message (the audit commit is done before the client sees the end); once the upstream's
    usage has come, the message says so (`RECORD_FINAL`): the commit starts then, alongside
    the upstream's own before its [DONE], and the end follows it. The iterator is always
    closed, which closes the upstream stream at once when the client goes away."""

    def __init__(self, events: AsyncGenerator[tuple[bytes, Relayed]]) -> None:
        self._events = events
        super().__init__(
            (),  # unused: `stream_response` reads `events` itself
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})  # fmt: skip
        async for event, state in self._events:
            if state == "last":
                await send({"type": "http.response.body", "body": event, "more_body": False})
                return
            message: Message = {"type": "http.response.body", "body": event, "more_body": True}
            if state == "final":
                message[RECORD_FINAL] = True
            await send(message)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Starlette's own watches the client in an anyio task group; `unless_gone` sends in
        # this task with one watcher, for less on every relayed stream.
        try:
            await unless_gone(receive, self.stream_response(send))
        finally:
            await self._events.aclose()
