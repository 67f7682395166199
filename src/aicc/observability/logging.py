"""Logs: one handler on the root logger, JSON for machines or text for people, and the access
log line of every HTTP call.

JSON shape (`log_format: json`, the default): one object per line, flat dotted keys in Elastic
Common Schema (ECS) names — Filebeat and Elasticsearch expand the dots, Loki and `jq` read them
as they are. Every line has

    @timestamp      ISO-8601 UTC, milliseconds ("2025-01-31T12:00:00.123Z")
    log.level       "debug" | "info" | "warning" | "error" | "critical"
    log.logger      the Python logger ("aicc.access", "uvicorn.error", ...)
    message         the human sentence
    ecs.version     "8.11.0"

and, when known:

    http.request.id            the request id (also sent back in `X-Request-ID`); on every
                               line logged while a request is served, not only the access line
    error.type / error.message / error.stack_trace    for a logged exception

The access line (logger "aicc.access"; INFO, ERROR for a 5xx) adds

    event.dataset              "aicc.access"
    http.request.method        "POST"
    http.route                 the route template ("/admin/users/{username}"; absent if none)
    url.path                   the raw path (never the query string)
    http.response.status_code  200 (499: the client went away first)
    event.duration             the latency in nanoseconds (ECS's unit)
    client.address             the peer address
    user.name / user.id / user.roles    the authenticated principal
    aicc.key_id | aicc.session_id       which credential (its public id, never the secret)
    aicc.model, aicc.prompt_tokens, aicc.completion_tokens, aicc.finish_reason,
    aicc.stream, aicc.ttft_ms, aicc.queue_ms, error.code

Nothing here logs a credential, a password or a prompt: the access line is built from the call
record's public fields only, and every rendered line is scrubbed of anything shaped like an aicc
token or a bearer header in case an exception message carries one.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal, TextIO

from aicc.api.record import CallOutcome, CallRecord

LogFormat = Literal["json", "text"]

ACCESS_LOGGER = "aicc.access"
ECS_VERSION = "8.11.0"

_HANDLER_NAME = "aicc"
_FIELDS_ATTR = "aicc_fields"
"""LogRecord attribute holding an access line's structured fields."""
_request_id: ContextVar[str | None] = ContextVar("aicc_request_id", default=None)

# Defence in depth: our tokens carry a prefix, so one slipping into an exception message is
# caught here. Bearer values of any shape are cut too.
_TOKEN = re.compile(r"\b(aicc-s[kt]-)[A-Za-z0-9_-]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")
_REDACTED = "[REDACTED]"

_access_logger = logging.getLogger(ACCESS_LOGGER)


def configure_logging(level: str, fmt: LogFormat, *, stream: TextIO | None = None) -> None:
    """Send every logger's records (uvicorn's included) through one handler on `stream`
    (stderr by default) in format `fmt`, at `level` and above.

    Idempotent: a second call replaces the handler the first installed. Handlers of others on
    the root logger (pytest's capture) are left alone. uvicorn's access log is switched off:
    `log_call` writes ours. Pass `uvicorn_logging_options()` to `uvicorn.Config`, else uvicorn
    installs its own handlers over these. Raises ValueError for an unknown level.
    """
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi", ACCESS_LOGGER):
        # Levels and handlers an earlier uvicorn.Config (or dictConfig) left behind go: the
        # root's level and our handler decide.
        named = logging.getLogger(name)
        named.handlers.clear()
        named.setLevel(logging.NOTSET)
        named.propagate = True
        named.disabled = False
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers.clear()
    uvicorn_access.propagate = False
    uvicorn_access.disabled = True


def uvicorn_logging_options() -> dict[str, Any]:
    """`uvicorn.Config` keyword arguments that keep uvicorn from installing its own log
    handlers (its records then reach ours) and from writing its own access log."""
    return {"log_config": None, "access_log": False}


@contextmanager
def request_context(request_id: str) -> Iterator[None]:
    """Tag every line logged inside (in this task and the tasks it starts) with the id."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


def log_call(record: CallRecord, outcome: CallOutcome) -> None:
    """Write the access line of one finished call (INFO; ERROR for a 5xx)."""
    level = logging.ERROR if outcome.status >= 500 else logging.INFO
    if not _access_logger.isEnabledFor(level):
        return  # the common case under load at level warning: build nothing
    latency_ms = outcome.latency_s * 1000
    message = f"{outcome.method} {outcome.path} {outcome.status} {latency_ms:.1f}ms"
    _access_logger.log(level, message, extra={_FIELDS_ATTR: access_fields(record, outcome)})


def access_fields(record: CallRecord, outcome: CallOutcome) -> dict[str, Any]:
    """The structured (ECS-named) fields of a call's access line, absent values left out."""
    fields: dict[str, Any] = {
        "event.dataset": ACCESS_LOGGER,
        "http.request.id": record.request_id,
        "http.request.method": outcome.method,
        "http.route": outcome.route or None,
        "url.path": outcome.path,
        "http.response.status_code": outcome.status,
        "event.duration": round(outcome.latency_s * 1e9),
        "client.address": outcome.client_addr,
        "error.code": record.error_code,
        "aicc.model": record.model,
        "aicc.prompt_tokens": record.num_prompt_tokens,
        "aicc.completion_tokens": record.num_completion_tokens,
        "aicc.finish_reason": record.finish_reason,
        "aicc.stream": record.is_stream or None,
        "aicc.ttft_ms": _ms(record.time_to_first_token_s),
        "aicc.queue_ms": _ms(record.queue_time_s),
    }
    principal = record.principal
    if principal is not None:
        fields["user.name"] = principal.username
        fields["user.id"] = str(principal.user_id)
        fields["user.roles"] = list(principal.roles)
        credential = "aicc.key_id" if principal.via == "key" else "aicc.session_id"
        fields[credential] = principal.credential_id
    return {key: value for key, value in fields.items() if value is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, in the shape the module docstring describes."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "@timestamp": _utc_iso(record.created),
            "log.level": record.levelname.lower(),
            "log.logger": record.name,
            "message": record.getMessage(),
            "ecs.version": ECS_VERSION,
        }
        request_id = _request_id.get()
        if request_id is not None:
            document["http.request.id"] = request_id
        document.update(getattr(record, _FIELDS_ATTR, {}))
        if record.exc_info is not None and record.exc_info[1] is not None:
            error = record.exc_info[1]
            document["error.type"] = type(error).__qualname__
            document["error.message"] = str(error)
            document["error.stack_trace"] = self.formatException(record.exc_info)
        elif record.stack_info:
            document["error.stack_trace"] = record.stack_info
        line = json.dumps(document, ensure_ascii=False, separators=(",", ":"), default=str)
        return redact(line)


class TextFormatter(logging.Formatter):
    """`2025-01-31T12:00:00.123Z INFO    aicc.access: GET /v1/models 200 1.2ms user=alice`"""

    _SUFFIX_FIELDS = (
        ("user", "user.name"),
        ("model", "aicc.model"),
        ("tokens_in", "aicc.prompt_tokens"),
        ("tokens_out", "aicc.completion_tokens"),
        ("error", "error.code"),
    )

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            _utc_iso(record.created),
            f"{record.levelname:<7}",
            f"{record.name}: {record.getMessage()}",
        ]
        fields: dict[str, Any] = getattr(record, _FIELDS_ATTR, {})
        parts.extend(
            f"{label}={fields[key]}" for label, key in self._SUFFIX_FIELDS if key in fields
        )
        request_id = fields.get("http.request.id") or _request_id.get()
        if request_id is not None:
            parts.append(f"request_id={request_id}")
        text = " ".join(parts)
        if record.exc_info is not None:
            text += "\n" + self.formatException(record.exc_info)
        elif record.stack_info:
            text += "\n" + record.stack_info
        return redact(text)


def redact(text: str) -> str:
    """`text` with aicc tokens and bearer credentials replaced by a marker."""
    return _BEARER.sub(r"\1" + _REDACTED, _TOKEN.sub(r"\1" + _REDACTED, text))


def _utc_iso(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
