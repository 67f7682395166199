"""The recording middleware's hand-off to the audit log: a plain response leaves (headers and
body together) only once its entry is committed and the app has returned; a failed commit is
answered 503; a stream opens before its headers. The sink is a stand-in that records when it
is called, so the order of messages can be checked exactly."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from aicc.api.observe import RecordingMiddleware
from aicc.api.record import RECORD_FINAL, CallOutcome, CallRecord
from aicc.audit import AuditWriteError

BODY = b'{"ok":true}'


class Sink:
    """Audit and metrics sink: notes each call among the messages sent so far."""

    def __init__(self, sent: list[Any], *, fail: bool = False) -> None:
        self.sent = sent
        self.fail = fail
        self.observed: list[int] = []

    async def open_call(self, record: CallRecord, outcome: CallOutcome) -> None:
        self.sent.append(("open", outcome.status))

    async def append(self, record: CallRecord, outcome: CallOutcome) -> None:
        await asyncio.sleep(0)  # a real commit waits for the writer process
        if self.fail:
            raise AuditWriteError("the audit log could not record this call")
        self.sent.append(("append", outcome.status))

    def start_append(self, record: CallRecord, outcome: CallOutcome) -> asyncio.Future[None]:
        return asyncio.ensure_future(self.append(record, outcome))

    def observe_call(self, record: CallRecord, outcome: CallOutcome) -> None:
        self.observed.append(outcome.status)


def run(
    messages: list[Message],
    *,
    audited: bool = True,
    is_stream: bool = False,
    fail: bool = False,
    pauses: bool = False,
    sent: list[Any] | None = None,
) -> list[Any]:
    """Serve one call through the middleware; what reached the server, in order (into `sent`
    when given). `pauses`: the app lets other tasks run between its messages (as a relay
    waiting on reads does)."""
    sent = [] if sent is None else sent
    sink = Sink(sent, fail=fail)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for message in messages:
            await send(message)
            for _ in range(3 if pauses else 0):
                await asyncio.sleep(0)
        sent.append(("app returned",))

    async def server_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            sent.append(("start", message["status"]))
        else:
            sent.append(("body", message.get("body", b""), message.get("more_body", False)))

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    record = CallRecord("req-1")
    record.is_stream = is_stream
    state = SimpleNamespace(audit=sink if audited else None, metrics=sink, log_call=None)
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v1/models",
        "app": SimpleNamespace(state=state),
        "state": {"call_record": record},
        "client": ("127.0.0.1", 5000),
    }
    asyncio.run(RecordingMiddleware(app)(scope, receive, server_send))
    sent.append(("observed", sink.observed))
    return sent


def start(status: int = 200, *, length: bool = True) -> Message:
    headers = [(b"content-type", b"application/json")]
    if length:
        headers.append((b"content-length", str(len(BODY)).encode()))
    return {"type": "http.response.start", "status": status, "headers": headers}


def body(data: bytes = BODY, *, more: bool = False) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


def test_a_plain_response_leaves_whole_after_the_app_returned_and_the_commit() -> None:
    assert run([start(), body()]) == [
        ("app returned",),
        ("append", 200),
        ("start", 200),
        ("body", BODY, False),
        ("observed", [200]),
    ]


def test_a_failed_commit_is_answered_503_instead_of_a_200_without_its_body() -> None:
    sent = run([start(), body()], fail=True)
    assert [event[:2] for event in sent[:2]] == [("app returned",), ("start", 503)]
    assert b'"code":"audit_unavailable"' in sent[2][1]
    assert sent[-1] == ("observed", [503])


def test_a_stream_opens_before_its_headers_and_commits_before_its_last_byte() -> None:
    sent = run([start(length=False), body(b"data: 1\n\n", more=True), body(b"")], is_stream=True)
    assert sent == [
        ("open", 200),
        ("start", 200),
        ("body", b"data: 1\n\n", True),
        ("app returned",),
        ("append", 200),
        ("body", b"", False),
        ("observed", [200]),
    ]


def test_a_stream_whose_record_is_final_commits_early_and_once() -> None:
    final = {**body(b"usage\n\n", more=True), RECORD_FINAL: True}
    sent = run(
        [start(length=False), body(b"data: 1\n\n", more=True), final, body(b"[DONE]")],
        is_stream=True,
        pauses=True,
    )
    assert sent == [
        ("open", 200),
        ("start", 200),
        ("body", b"data: 1\n\n", True),
        ("body", b"usage\n\n", True),  # the commit runs meanwhile, not before this
        ("append", 200),
        ("body", b"[DONE]", False),  # committed: the end need not wait for the app's cleanup
        ("app returned",),
        ("observed", [200]),
    ]


def test_a_failed_early_commit_holds_the_end_and_cuts_the_stream() -> None:
    final = {**body(b"usage\n\n", more=True), RECORD_FINAL: True}
    messages = [start(length=False), body(b"data: 1\n\n", more=True), final, body(b"[DONE]")]
    sent: list[Any] = []
    with pytest.raises(AuditWriteError):  # the server cuts the connection
        run(messages, is_stream=True, pauses=True, fail=True, sent=sent)
    assert sent[-1] == ("app returned",)  # no end: the client never sees a clean finish


def test_an_early_commit_stands_for_a_stream_the_client_left() -> None:
    final = {**body(b"usage\n\n", more=True), RECORD_FINAL: True}
    sent = run([start(length=False), final], is_stream=True)  # no last message
    assert sent.count(("append", 200)) == 1
    assert sent[-1] == ("observed", [499])


def test_a_response_in_pieces_sends_its_headers_with_the_first() -> None:
    sent = run([start(length=False), body(b"a", more=True), body(b"")])
    assert sent[:3] == [("start", 200), ("body", b"a", True), ("app returned",)]
    assert sent[3:5] == [("append", 200), ("body", b"", False)]


def test_without_the_audit_log_messages_pass_straight_through() -> None:
    assert run([start(), body()], audited=False) == [
        ("start", 200),
        ("body", BODY, False),
        ("app returned",),
        ("observed", [200]),
    ]
