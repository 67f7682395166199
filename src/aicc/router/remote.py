"""A remote replica: another aicc or any OpenAI-compatible server, reached over HTTP(S).

Streams are passed through event by event, unchanged; the gateway measures tokens, finish
reason and token times itself, so remote replicas fill the same metrics as local engines.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import httpx

from aicc.errors import ConfigError, InvalidRequestError
from aicc.router.http1 import Http1Pool, Http1Response, TransportError
from aicc.router.upstream import ErrorKind, UpstreamError, UpstreamResponse, upstream_error

__all__ = ["PROXIED_PATHS", "RemoteClient", "RemoteUpstream", "UpstreamError"]

PROXIED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})

# Never forwarded upstream: hop-by-hop headers, the caller's credentials, and what we set.
_DROPPED_REQUEST_HEADERS = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "host", "content-length", "content-type",
        "accept-encoding", "authorization", "x-api-key", "cookie",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class RemoteUpstream:
    """Where a remote replica is and how long to wait for it.

    `url` is the server's base (`https://host:8000`; a trailing `/v1` is accepted).
    Raises `InvalidRequestError` for a URL or timeout that cannot work.
    """

    url: str
    api_key: str | None = field(repr=False)
    _: KW_ONLY
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 60.0
    """Streams: from sending the request to the first event. A non-streamed answer only
    starts when it is complete, so it gets `total_timeout_s` instead."""
    idle_timeout_s: float = 60.0
    """Longest gap between two reads of the answer."""
    total_timeout_s: float = 600.0
    check_timeout_s: float = 5.0
    """For health checks and the model list."""
    verify: bool | str = True
    """TLS: verify against the system CAs (True), a CA bundle file (path), or not at all."""
    max_response_bytes: int = 256 * 1024 * 1024
    """Largest non-streamed answer (and the largest single event of a stream is 1 MiB)."""

    def __post_init__(self) -> None:
        try:
            parsed = httpx.URL(self.url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise InvalidRequestError(f"invalid upstream URL: {exc}", param="url") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise InvalidRequestError(
                "an upstream URL needs http:// or https:// and a host", param="url"
            )
        if parsed.userinfo or parsed.query or parsed.fragment:
            raise InvalidRequestError(
                "an upstream URL takes no user, query or fragment (the key is separate)",
                param="url",
            )
        base = str(parsed.copy_with(path=parsed.path.rstrip("/").removesuffix("/v1")))
        object.__setattr__(self, "url", base.rstrip("/"))
        for name in ("connect_timeout_s", "first_byte_timeout_s", "idle_timeout_s",
                     "total_timeout_s", "check_timeout_s"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0:
                raise InvalidRequestError(f"{name} must be > 0, got {value!r}", param=name)

    @property
    def address(self) -> str:
        """host:port, the only part of the upstream that error messages name."""
        parsed = httpx.URL(self.url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
        return f"{host}:{port}"


class RemoteClient:
    """Sends OpenAI requests to one remote upstream, over kept-alive connections."""

    def __init__(self, upstream: RemoteUpstream) -> None:
        """Raises `ConfigError` when the upstream's CA bundle cannot be loaded."""
        self.upstream = upstream
        parsed = httpx.URL(upstream.url)
        is_tls = parsed.scheme == "https"
        self._base_path = parsed.raw_path.decode("ascii").rstrip("/")
        self._pool = Http1Pool(
            parsed.host,
            parsed.port or (443 if is_tls else 80),
            tls=_tls_context(upstream.verify) if is_tls else None,
            connect_timeout_s=upstream.connect_timeout_s,
        )
        self._auth = f"Bearer {upstream.api_key}" if upstream.api_key else None

    async def open(
        self, path: str, body: Mapping[str, Any], *, headers: Mapping[str, str] | None = None
    ) -> UpstreamResponse:
        """Send `body` to `path` and wait for the answer's headers.

        A 2xx or 4xx answer comes back (4xx to pass on as-is: `is_stream` is False, read it
        with `json()`). Raises `UpstreamError` for 5xx, connection errors and timeouts, and
        `InvalidRequestError` for a path that is not proxied.
        """
        if path not in PROXIED_PATHS:
            raise InvalidRequestError(f"{path} is not proxied to upstreams", param="path")
        payload = dict(body)
        wants_stream = payload.get("stream") is True
        drop_usage = False
        if wants_stream:
            options = payload.get("stream_options")
            options = dict(options) if isinstance(options, Mapping) else {}
            if options.get("include_usage") is not True:
                # Usage is needed for metering; the extra chunk is dropped again on the way back.
                payload["stream_options"] = {**options, "include_usage": True}
                drop_usage = True
        content = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        started = time.perf_counter()
        wait_s = (
            self.upstream.first_byte_timeout_s if wants_stream else self.upstream.total_timeout_s
        )
        response = await self._send(
            "POST",
            path,
            self._request_headers(headers, stream=wants_stream),
            content,
            min(wait_s, self.upstream.total_timeout_s),
        )
        answer = UpstreamResponse(
            response,
            self.upstream,
            started=started,
            wants_stream=wants_stream,
            drop_usage=drop_usage,
        )
        if 200 <= response.status_code < 300 or 400 <= response.status_code < 500:
            if answer.is_stream and not _is_event_stream(response):
                await answer.aclose()
                raise self._error(
                    "protocol", "answered a stream request without an event stream", True
                )
            return answer
        detail = await answer.error_detail()
        raise self._error("http", f"answered {response.status_code}{detail}", True)

    async def health(self) -> bool:
        """Whether the upstream is ready: GET /readyz, or GET /v1/models where that is unknown."""
        for path in ("/readyz", "/v1/models"):
            try:
                async with asyncio.timeout(self.upstream.check_timeout_s):
                    response = await self._pool.request(
                        "GET", self._base_path + path, self._request_headers(None, stream=False)
                    )
                    try:
                        while await response.next_chunk() is not None:
                            pass
                    finally:
                        await response.aclose()
            except (TransportError, TimeoutError):
                return False
            if response.status_code not in (404, 405):
                return response.is_success
        return False

    async def models(self) -> list[dict[str, Any]]:
        """The upstream's model list (`data` of GET /v1/models). Raises `UpstreamError`."""
        headers = self._request_headers(None, stream=False)
        response = await self._send(
            "GET", "/v1/models", headers, b"", self.upstream.check_timeout_s
        )
        answer = UpstreamResponse(
            response, self.upstream, started=time.perf_counter(), wants_stream=False,
            drop_usage=False,
        )  # fmt: skip
        if not response.is_success:
            detail = await answer.error_detail()
            raise self._error("http", f"answered {response.status_code}{detail}", False)
        data = (await answer.json()).get("data")
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise self._error("protocol", "sent a model list without a `data` list", False)
        return data

    @property
    def is_closed(self) -> bool:
        return self._pool.is_closed

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def _send(
        self, method: str, path: str, headers: dict[str, str], content: bytes, wait_s: float
    ) -> Http1Response:
        try:
            async with asyncio.timeout(wait_s):
                return await self._pool.request(method, self._base_path + path, headers, content)
        except TimeoutError:
            raise self._error("timeout", f"sent no answer within {wait_s:g} s", True) from None
        except TransportError as exc:
            raise self._error(exc.kind, exc.reason, True) from None

    def _request_headers(self, extra: Mapping[str, str] | None, *, stream: bool) -> dict[str, str]:
        headers = {
            name: value
            for name, value in (extra or {}).items()
            if name.lower() not in _DROPPED_REQUEST_HEADERS
        }
        headers["content-type"] = "application/json"
        headers["accept"] = "text/event-stream" if stream else "application/json"
        headers["accept-encoding"] = "identity"  # compression would hold events back
        headers["user-agent"] = "aicc"
        if self._auth is not None:
            headers["authorization"] = self._auth
        return headers

    def _error(self, kind: ErrorKind, reason: str, retryable: bool) -> UpstreamError:
        return upstream_error(self.upstream, kind, reason, retryable=retryable)


def _tls_context(verify: bool | str) -> ssl.SSLContext:
    """The TLS context for `RemoteUpstream.verify`: the system's CAs, a bundle, or none.

    Raises `ConfigError` when the bundle cannot be loaded.
    """
    try:
        context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the upstream CA bundle {verify}: {exc}") from None
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def _is_event_stream(response: Http1Response) -> bool:
    content_type: str = response.headers.get("content-type", "")
    return content_type.lower().startswith("text/event-stream")
