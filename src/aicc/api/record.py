"""What the gateway learns about one HTTP call while serving it: the audit log, the metrics and
the access log all read this one record when the response is done.

The outermost middleware puts a `CallRecord` in the ASGI scope's state; authentication, the
inference dependency and the serving layer fill in what they learn. Only that middleware reads
it, after the last response byte is ready.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.types import Scope

from aicc.auth.principal import Principal


@dataclass(slots=True)
class CallRecord:
    request_id: str
    started_at: float = field(default_factory=time.time)
    """Wall-clock start (Unix seconds)."""
    started: float = field(default_factory=time.perf_counter)
    """Monotonic start, for latencies."""
    principal: Principal | None = None
    model: str | None = None
    num_prompt_tokens: int | None = None
    num_completion_tokens: int | None = None
    finish_reason: str | None = None
    """The first choice's finish reason (`stop`, `length`, `tool_calls`, …)."""
    first_token_at: float | None = None
    """Monotonic time of the first generated token."""
    last_token_at: float | None = None
    queue_time_s: float | None = None
    """Time the request waited in the engine's queue before its prompt was computed."""
    is_stream: bool = False
    error_code: str | None = None
    """The OpenAI-style error code of a failed call (`invalid_api_key`, `rate_limit_exceeded`)."""
    detail: dict[str, Any] | None = None
    """What an administrative call changed (secrets removed), for the audit log."""
    prompt_text: str | None = None
    """The prompt as rendered, kept only when prompt capture is on (stored encrypted)."""
    completion_text: list[str] = field(default_factory=list)
    """Completion pieces, kept only when prompt capture is on."""

    @property
    def time_to_first_token_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def time_per_output_token_s(self) -> float | None:
        """Mean gap between generated tokens after the first (None below two tokens)."""
        tokens = self.num_completion_tokens or 0
        if self.first_token_at is None or self.last_token_at is None or tokens < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (tokens - 1)


RECORD_FINAL = "aicc.record_final"
"""Set on a stream's body message (`more_body` still true) once its record holds everything
the audit entry needs: the entry is committed from then on, while the rest is relayed."""


def scope_record(scope: Scope) -> CallRecord | None:
    record = scope.get("state", {}).get("call_record")
    return record if isinstance(record, CallRecord) else None


def call_record(request: Request) -> CallRecord | None:
    """The record of this call (None when no recording middleware runs, e.g. unit tests)."""
    return scope_record(request.scope)


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """How a call ended, as the recording middleware saw it."""

    method: str
    route: str
    """The route template (`/admin/users/{username}`); "" when no route matched."""
    path: str
    status: int
    """The status sent; 499 when the client went away before the response ended."""
    latency_s: float
    client_addr: str | None
    body_sha256: str | None
    """Hex SHA-256 of the request body (None without a body)."""
