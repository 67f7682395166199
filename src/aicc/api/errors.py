"""The one place where errors become OpenAI-style JSON: {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aicc.api.record import call_record
from aicc.errors import AiccError, AuthenticationError, QueueFullError, RateLimitedError

logger = logging.getLogger(__name__)

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(
    message: str, error_type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: AiccError) -> JSONResponse:
    headers = {}
    if isinstance(exc, QueueFullError | RateLimitedError):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    body = error_body(exc.message, exc.error_type, param=exc.param, code=exc.code)
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AiccError, _on_aicc_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected_error)


def _note(request: Request, code: str | None) -> None:
    """Keep the error's code on the call's record (audit entry, access log)."""
    record = call_record(request)
    if record is not None:
        record.error_code = code


async def _on_aicc_error(request: Request, exc: AiccError) -> JSONResponse:
    return aicc_error_response(request, exc)


def aicc_error_response(request: Request, exc: AiccError) -> JSONResponse:
    """The answer to a domain error, its code kept on the call's record (5xx logged)."""
    _note(request, exc.code or exc.error_type)
    if exc.status_code >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    return error_response(exc)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error_response(request, exc.errors())


def validation_error_response(request: Request, errors: Sequence[Any]) -> JSONResponse:
    """The 400 for a body that failed validation (pydantic's errors, first one reported)."""
    first: dict[str, Any] = dict(errors[0]) if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        message = "We could not parse the JSON body of your request: " + str(
            first.get("ctx", {}).get("error", "invalid JSON")
        )
        body = error_body(message, "invalid_request_error", code="invalid_json")
        _note(request, "invalid_json")
        return JSONResponse(body, status_code=400)
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    if first.get("type") == "missing":
        code = "missing_required_parameter"
    elif first.get("type") == "model_attributes_type":
        code = "invalid_type"
    else:
        code = "invalid_value"
    body = error_body(message, "invalid_request_error", param=param, code=code)
    _note(request, code)
    return JSONResponse(body, status_code=400)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"Unknown route {request.method} {request.url.path}"
    else:
        message = str(exc.detail)
    error_type = _STATUS_TYPES.get(exc.status_code, "server_error")
    body = error_body(message, error_type, code=str(exc.status_code))
    _note(request, str(exc.status_code))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    _note(request, "server_error")
    body = error_body("The server had an error while processing your request.", "server_error")
    return JSONResponse(body, status_code=500)
