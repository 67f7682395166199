"""The inference routes' one dependency: who calls, may they use this model, is their quota left.

The lease it yields counts a generation in flight (concurrent-stream limits) until the response
has been sent, and receives the engine's real token counts (`serving` records them).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from aicc.api.openai.serving import Metering
from aicc.api.record import CallRecord, call_record
from aicc.auth.deps import require
from aicc.auth.permissions import Permission
from aicc.auth.principal import Principal
from aicc.errors import EngineUnavailableError, PermissionDeniedError
from aicc.quota import RateLimiter, UsageLease


@dataclass(frozen=True, slots=True)
class InferenceCaller:
    principal: Principal
    usage: UsageLease
    record: CallRecord | None = None
    """This call's record (tokens, timings, finish reason land there)."""
    capture_content: bool = False
    """Keep the completion text on the record (audit content capture)."""

    @property
    def metering(self) -> Metering:
        return Metering(self.usage, self.record, self.capture_content)

    @property
    def cache_scope(self) -> str:
        """Prefix-cache partition: a user's requests share cached prompts, users never do."""
        return self.principal.tenant


def check_model_access(principal: Principal, model: str) -> None:
    """Raise PermissionDeniedError unless the caller's roles and key allow `model`."""
    if not principal.can_use_model(model):
        raise PermissionDeniedError(
            f"Your credential may not use the model {model!r}.", param="model"
        )


async def inference_caller(
    request: Request, principal: Annotated[Principal, require(Permission.INFERENCE)]
) -> AsyncIterator[InferenceCaller]:
    caller = open_caller(request, principal, await checked_body(request, principal))
    try:
        yield caller
    finally:
        caller.usage.release()


def open_caller(
    request: Request, principal: Principal, body: dict[str, Any] | None
) -> InferenceCaller:
    """The caller of an inference request whose body was checked (`checked_body`): its record
    filled in and a generation lease taken — release it (`usage.release()`) once the response
    has been sent. Raises the rate limiter's errors."""
    capture: bool = request.app.state.settings.audit_capture_content
    record = call_record(request)
    if record is not None:
        record.is_stream = bool(body.get("stream")) if body else False
        if capture and body:
            record.prompt_text = _content_of(body)
    lease = _limiter(request).acquire(principal)
    return InferenceCaller(principal, lease, record, capture)


Caller = Annotated[InferenceCaller, Depends(inference_caller)]


async def inference_reader(
    request: Request, principal: Annotated[Principal, require(Permission.INFERENCE)]
) -> Principal:
    """The lighter check of routes that generate nothing (model lists, tokenization): the
    model allow-list and requests per minute, no stream slot."""
    await checked_body(request, principal)
    _limiter(request).admit(principal)
    return principal


Reader = Annotated[Principal, Depends(inference_reader)]


async def checked_body(request: Request, principal: Principal) -> dict[str, Any] | None:
    """The request's JSON body, after checking (and recording) the model it names."""
    body = await _json_body(request)
    model = _requested_model(request, body)
    record = call_record(request)
    if record is not None:
        record.model = model
    if model is not None:
        check_model_access(principal, model)
    return body


def _limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter | None = getattr(request.app.state, "limiter", None)
    if limiter is None:
        raise EngineUnavailableError("the server is starting; retry shortly")
    return limiter


async def _json_body(request: Request) -> dict[str, Any] | None:
    """The JSON object a POST carries (None otherwise; a body that does not parse is left to the
    route's validation, 400)."""
    if request.method != "POST":
        return None
    try:
        body: Any = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


async def requested_model(request: Request) -> str | None:
    """The `model` a request names (path parameter or JSON body; None if none). FastAPI has
    parsed the body already: `Request.json` returns that parse."""
    return _requested_model(request, await _json_body(request))


def _requested_model(request: Request, body: dict[str, Any] | None) -> str | None:
    """The `model` a request names: its path parameter, or its JSON body's field."""
    model = request.path_params.get("model_id")
    if isinstance(model, str):
        return model
    value = body.get("model") if body else None
    return value if isinstance(value, str) else None


def _content_of(body: dict[str, Any]) -> str:
    """What the caller asked the model (messages, prompt or input), for content capture."""
    content = {key: body[key] for key in ("messages", "prompt", "input") if key in body}
    return json.dumps(content, ensure_ascii=False)
