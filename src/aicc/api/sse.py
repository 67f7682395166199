"""Server-sent events for streamed completions."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from aicc.api.errors import error_body
from aicc.errors import AiccError

DONE = b"data: [DONE]\n\n"


def encode_event(payload: dict[str, Any]) -> bytes:
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        + b"\n\n"
    )


async def sse_stream(chunks: AsyncIterator[list[dict[str, Any]]]) -> AsyncGenerator[bytes]:
    """Encode chunks as SSE, those ready together as one piece (one write); an error
    mid-stream becomes an `error` event (headers are sent)."""
    try:
        async for ready in chunks:
            yield b"".join(map(encode_event, ready))
    except AiccError as exc:
        yield encode_event(error_body(exc.message, exc.error_type, param=exc.param, code=exc.code))
        return
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
    yield DONE


class EventStreamResponse(StreamingResponse):
    """A streaming response that always closes its iterator, so a client that goes away
    aborts its generation at once instead of whenever the iterator is garbage-collected."""

    def __init__(self, chunks: AsyncIterator[list[dict[str, Any]]]) -> None:
        self._events = sse_stream(chunks)
        super().__init__(
            self._events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def stream_response(self, send: Send) -> None:
        # The last event (`data: [DONE]`) goes out as the final body message: what runs before
        # the final byte (the audit commit) then runs before the client sees the end.
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})  # fmt: skip
        last = b""
        async for chunk in self._events:
            if chunk == DONE:  # always the stream's last event
                last = chunk
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": last, "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
