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
from aicc.router.upstream import (
    ErrorKind,
    UpstreamError,
    UpstreamResponse,
    classify_transport_error,
    upstream_error,
)

__all__ = ["PROXIED_PATHS", "RemoteClient", "RemoteUpstream", "UpstreamError"]

PROXIED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})

# Never forwarded upstream: hop-by-hop headers, the caller's credentials, and what httpx sets.
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
    """Sends OpenAI requests to one remote upstream."""

    def __init__(self, upstream: RemoteUpstream, client: httpx.AsyncClient | None = None) -> None:
        """`client`: a shared pool; without one the client makes (and closes) its own.

        Raises `ConfigError` when the upstream's CA bundle cannot be loaded.
        """
        self.upstream = upstream
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            verify=_tls_verify(upstream.verify),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            trust_env=False,  # no proxy or CA settings picked up from the environment
        )
        # Our own deadlines (asyncio.timeout) bound every wait; httpx only bounds connecting.
        self._timeout = httpx.Timeout(
            connect=upstream.connect_timeout_s,
            read=None,
            write=upstream.idle_timeout_s,
            pool=upstream.first_byte_timeout_s,
        )

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
        request = self._client.build_request(
            "POST",
            self.upstream.url + path,
            content=json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode(),
            headers=self._request_headers(headers, stream=wants_stream),
            timeout=self._timeout,
        )
        started = time.perf_counter()
        wait_s = (
            self.upstream.first_byte_timeout_s if wants_stream else self.upstream.total_timeout_s
        )
        response = await self._send(request, min(wait_s, self.upstream.total_timeout_s))
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
                    response = await self._client.get(
                        self.upstream.url + path,
                        headers=self._request_headers(None, stream=False),
                        timeout=self._timeout,
                    )
            except (httpx.HTTPError, TimeoutError):
                return False
            if response.status_code not in (404, 405):
                return response.is_success
        return False

    async def models(self) -> list[dict[str, Any]]:
        """The upstream's model list (`data` of GET /v1/models). Raises `UpstreamError`."""
        request = self._client.build_request(
            "GET",
            self.upstream.url + "/v1/models",
            headers=self._request_headers(None, stream=False),
            timeout=self._timeout,
        )
        response = await self._send(request, self.upstream.check_timeout_s)
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

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def _send(self, request: httpx.Request, wait_s: float) -> httpx.Response:
        try:
            async with asyncio.timeout(wait_s):
                return await self._client.send(request, stream=True)
        except TimeoutError:
            raise self._error("timeout", f"sent no answer within {wait_s:g} s", True) from None
        except httpx.ConnectTimeout:
            limit = self.upstream.connect_timeout_s
            raise self._error("timeout", f"could not be reached within {limit:g} s", True) from None
        except httpx.HTTPError as exc:
            kind, reason = classify_transport_error(exc)
            raise self._error(kind, reason, True) from None

    def _request_headers(self, extra: Mapping[str, str] | None, *, stream: bool) -> dict[str, str]:
        headers = {
            name: value
            for name, value in (extra or {}).items()
            if name.lower() not in _DROPPED_REQUEST_HEADERS
        }
        headers["content-type"] = "application/json"
        headers["accept"] = "text/event-stream" if stream else "application/json"
        if stream:
            headers["accept-encoding"] = "identity"  # compression would hold events back
        if self.upstream.api_key:
            headers["authorization"] = f"Bearer {self.upstream.api_key}"
        return headers

    def _error(self, kind: ErrorKind, reason: str, retryable: bool) -> UpstreamError:
        return upstream_error(self.upstream, kind, reason, retryable=retryable)


def _tls_verify(verify: bool | str) -> ssl.SSLContext | bool:
    """httpx's `verify` for ours: a CA bundle path becomes a context (httpx deprecates paths).

    Raises `ConfigError` when the bundle cannot be loaded.
    """
    if isinstance(verify, bool):
        return verify
    try:
        return ssl.create_default_context(cafile=verify)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the upstream CA bundle {verify}: {exc}") from None


def _is_event_stream(response: httpx.Response) -> bool:
    content_type: str = response.headers.get("content-type", "")
    return content_type.lower().startswith("text/event-stream")
