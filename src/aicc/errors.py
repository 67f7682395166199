"""Domain errors. The API maps each to OpenAI's error JSON in one place (`aicc.api.errors`)."""

from __future__ import annotations


class AiccError(Exception):
    """Base of every error aicc raises on purpose."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigError(AiccError):
    """A setting is invalid; start-up stops."""

    code = "invalid_config"


class ModelNotFoundError(AiccError):
    """The requested model is not served here."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class InvalidRequestError(AiccError):
    """The request is well-formed JSON but asks for something invalid."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_value"


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus completion would not fit the model's context."""

    code = "context_length_exceeded"


class QueueFullError(AiccError):
    """The engine's waiting queue is full; the client should retry later."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineUnavailableError(AiccError):
    """The engine is not running (starting, stopped or dead)."""

    status_code = 503
    error_type = "server_error"
    code = "engine_unavailable"


class RequestTimeoutError(AiccError):
    """The generation ran past `request_timeout_s` and was aborted."""

    status_code = 504
    error_type = "server_error"
    code = "request_timeout"


class ModelLoadError(AiccError):
    """A model file is missing or llama.cpp could not load it."""

    code = "model_load_failed"


class AuthenticationError(AiccError):
    """No valid credential: missing, unknown, expired or revoked (never says which)."""

    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(AiccError):
    """The caller is known but may not do this."""

    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"


class NotFoundError(AiccError):
    """A named user, role, key or session does not exist."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ConflictError(AiccError):
    """The change conflicts with what exists (a duplicate name, a built-in role)."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class RateLimitedError(AiccError):
    """A rate limit or quota of the caller's user or key is spent; retry after `retry_after_s`."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
