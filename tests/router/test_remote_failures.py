"""The remote client against scripted loopback servers: what it sends, and every way an
upstream can fail (hang, garbage, a stream cut short, a refused connection, 5xx)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from aicc.errors import ConfigError, InvalidRequestError
from aicc.router.remote import RemoteClient, RemoteUpstream, UpstreamError
from aicc.tls import init_certs
from tests.router.scripted import (
    Respond,
    answer,
    closed_port,
    hang,
    routes,
    scripted_server,
    sse_events,
    stream,
)

T = TypeVar("T")
KEY = "sk-upstream-secret-0123456789"
CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
STREAM_BODY = {**BODY, "stream": True}
EVENTS = sse_events(
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None},
    {"choices": [{"index": 0, "delta": {"content": "Hel"}}], "usage": None},
    {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}},
    "[DONE]",
)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def upstream(url: str, **timeouts: Any) -> RemoteUpstream:
    return RemoteUpstream(url, KEY, **timeouts)


async def collect(client: RemoteClient, body: dict[str, Any]) -> tuple[list[bytes], Any]:
    """Open a stream and read it; the chunks read and the error it ended in (or None)."""
    response = await client.open(CHAT, body)
    chunks: list[bytes] = []
    try:
        async for chunk in response.chunks():
            chunks.append(chunk)
    except UpstreamError as exc:
        return chunks, exc
    return chunks, None


def test_stream_passes_events_through_and_drops_the_usage_it_added() -> None:
    async def go() -> None:
        async with scripted_server(stream(EVENTS)) as server:
            client = RemoteClient(upstream(server.url + "/v1/"))
            headers = {"Authorization": "Bearer caller-key", "x-request-id": "req-1",
                       "Connection": "keep-alive", "Cookie": "a=b"}  # fmt: skip
            response = await client.open(CHAT, STREAM_BODY, headers=headers)
            assert response.is_stream
            assert response.status == 200
            assert response.headers == {"content-type": "text/event-stream"}
            chunks = [chunk async for chunk in response.chunks()]
            sent_headers, _ = server.requests[0]
            assert sent_headers["authorization"] == f"Bearer {KEY}"
            assert sent_headers["x-request-id"] == "req-1"
            assert "cookie" not in sent_headers
            assert server.body()["stream_options"] == {"include_usage": True}
            assert server.body()["messages"] == BODY["messages"]
            assert chunks == [EVENTS[0], EVENTS[1], EVENTS[2], EVENTS[4]]  # no usage chunk
            facts = response.facts
            assert (facts.num_prompt_tokens, facts.num_completion_tokens) == (7, 2)
            assert facts.finish_reason == "stop"
            assert facts.is_done
            assert facts.first_token_at is not None
            assert facts.last_token_at is not None
            assert response.started < facts.first_token_at < facts.last_token_at
            assert response.bytes_sent_to_client == sum(map(len, chunks))
            assert not response.can_retry

            asked = {**STREAM_BODY, "stream_options": {"include_usage": True}}
            chunks = [chunk async for chunk in (await client.open(CHAT, asked)).chunks()]
            assert chunks == EVENTS  # asked for: the usage chunk passes
            await client.aclose()

    run(go())


@pytest.mark.parametrize("is_stream", [True, False])
def test_an_upstream_that_never_answers_times_out(is_stream: bool) -> None:
    async def go() -> None:
        async with scripted_server(hang) as server:
            client = RemoteClient(
                upstream(server.url, first_byte_timeout_s=0.5, total_timeout_s=0.8)
            )
            started = time.monotonic()
            with pytest.raises(UpstreamError) as caught:
                await client.open(CHAT, STREAM_BODY if is_stream else BODY)
            elapsed = time.monotonic() - started
            await client.aclose()
        error = caught.value
        assert (error.kind, error.status_code, error.retryable) == ("timeout", 504, True)
        assert error.code == "upstream_timeout"
        limit = 0.5 if is_stream else 0.8
        assert limit <= elapsed < limit + 1.5  # slack for a busy machine
        assert error.message == f"upstream {error.upstream} sent no answer within {limit:g} s"

    run(go())


def test_a_stream_that_goes_quiet_times_out_and_cannot_be_retried() -> None:
    async def go() -> None:
        async with scripted_server(stream(EVENTS[:2], then="hang")) as server:
            client = RemoteClient(upstream(server.url, idle_timeout_s=0.3))
            chunks, error = await collect(client, STREAM_BODY)
            await client.aclose()
        assert chunks == EVENTS[:2]
        assert isinstance(error, UpstreamError)
        assert (error.kind, error.retryable) == ("timeout", False)
        assert "sent nothing for 0.3 s" in error.message

    run(go())


@pytest.mark.parametrize("chunked", [True, False])
def test_a_stream_closed_midway_is_a_closed_error(chunked: bool) -> None:
    async def go() -> None:
        async with scripted_server(stream(EVENTS[:2], then="close", chunked=chunked)) as server:
            client = RemoteClient(upstream(server.url))
            chunks, error = await collect(client, STREAM_BODY)
            await client.aclose()
        assert chunks == EVENTS[:2]
        assert isinstance(error, UpstreamError)
        assert (error.kind, error.retryable, error.status_code) == ("closed", False, 502)

    run(go())


GARBAGE: list[tuple[Respond, dict[str, Any], str]] = [
    (answer("200 OK", "text/plain", b"hello world"), BODY, "other than a JSON object"),
    (answer("200 OK", "application/json", b"[1, 2]"), BODY, "other than a JSON object"),
    (answer("200 OK", "text/plain", b"hello world"), STREAM_BODY, "without an event stream"),
    (stream(sse_events("not json", "[DONE]")), STREAM_BODY, "data is not a JSON object"),
    (stream([b"data: \xff\xfe\n\n"]), STREAM_BODY, "not UTF-8"),
    (answer("abc", "text/plain", b""), BODY, "did not answer in HTTP"),
]


@pytest.mark.parametrize(("respond", "body", "reason"), GARBAGE)
def test_garbage_is_a_protocol_error_still_retryable(
    respond: Respond, body: dict[str, Any], reason: str
) -> None:
    async def go() -> UpstreamError:
        async with scripted_server(respond) as server:
            client = RemoteClient(upstream(server.url))
            try:
                response = await client.open(CHAT, body)
                if response.is_stream:
                    async for _ in response.chunks():
                        raise AssertionError("garbage was passed on")
                else:
                    await response.json()
            except UpstreamError as exc:
                return exc
            finally:
                await client.aclose()
        raise AssertionError("no error")

    error = run(go())
    assert (error.kind, error.retryable, error.status_code) == ("protocol", True, 502)
    assert reason in error.message


def test_a_refused_connection_is_a_retryable_connect_error() -> None:
    port = closed_port()

    async def go() -> UpstreamError:
        client = RemoteClient(upstream(f"http://127.0.0.1:{port}"))
        try:
            await client.open(CHAT, BODY)
        except UpstreamError as exc:
            return exc
        finally:
            await client.aclose()
        raise AssertionError("no error")

    error = run(go())
    assert (error.kind, error.retryable, error.status_code) == ("connect", True, 502)
    assert error.message.startswith(f"upstream 127.0.0.1:{port} could not be reached")
    assert KEY not in error.message


def test_a_5xx_is_a_retryable_error_naming_the_upstreams_reason() -> None:
    body = b'{"error": {"message": "engine crashed", "type": "server_error"}}'

    async def go() -> UpstreamError:
        async with scripted_server(answer("500 Oops", "application/json", body)) as server:
            client = RemoteClient(upstream(server.url))
            try:
                await client.open(CHAT, STREAM_BODY)
            except UpstreamError as exc:
                return exc
            finally:
                await client.aclose()
        raise AssertionError("no error")

    error = run(go())
    assert (error.kind, error.retryable, error.status_code) == ("http", True, 502)
    assert error.message.endswith("answered 500: engine crashed")


def test_a_4xx_is_passed_on_and_a_non_json_one_gets_an_openai_body() -> None:
    limited = answer("429 Too Many", "application/json", b'{"error": {"message": "slow"}}')
    html = answer("404 Not Found", "text/html", b"<h1>nope</h1>")

    async def go() -> None:
        async with scripted_server(limited) as server:
            client = RemoteClient(upstream(server.url))
            response = await client.open(CHAT, STREAM_BODY)
            assert (response.status, response.is_stream) == (429, False)
            assert await response.json() == {"error": {"message": "slow"}}
            await client.aclose()
        async with scripted_server(html) as server:
            client = RemoteClient(upstream(server.url))
            response = await client.open(CHAT, BODY)
            error = (await response.json())["error"]
            assert response.status == 404
            assert error["message"] == f"upstream {client.upstream.address} answered 404"
            assert error["type"] == "invalid_request_error"
            await client.aclose()

    run(go())


def test_health_falls_back_to_the_model_list_and_fails_closed() -> None:
    models = b'{"object": "list", "data": [{"id": "m", "object": "model"}]}'
    not_found = answer("404 Not Found", "application/json", b"{}")
    only_models = routes({"/v1/models": answer("200 OK", "application/json", models)}, not_found)
    not_ready = answer("503 Unavailable", "application/json", b'{"status": "starting"}')

    async def check(url: str, **timeouts: float) -> bool:
        client = RemoteClient(upstream(url, **timeouts))
        try:
            return await client.health()
        finally:
            await client.aclose()

    async def go() -> tuple[list[bool], list[dict[str, Any]]]:
        results = []
        async with scripted_server(only_models) as server:
            results.append(await check(server.url))
            assert [headers["authorization"] for headers, _ in server.requests] == [
                f"Bearer {KEY}"
            ] * 2
            client = RemoteClient(upstream(server.url))
            listed = await client.models()
            await client.aclose()
        async with scripted_server(not_ready) as server:
            results.append(await check(server.url))
        async with scripted_server(hang) as server:
            results.append(await check(server.url, check_timeout_s=0.3))
        results.append(await check(f"http://127.0.0.1:{closed_port()}"))
        return results, listed

    results, listed = run(go())
    assert results == [True, False, False, False]
    assert listed == [{"id": "m", "object": "model"}]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host", "needs http:// or https://"),
        ("http://", "needs http:// or https:// and a host"),
        ("http://user:pw@host", "no user, query or fragment"),
        ("http://host?x=1", "no user, query or fragment"),
    ],
)
def test_bad_upstream_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        RemoteUpstream(url, None)


def test_upstream_settings_normalise_and_keep_the_key_out_of_sight() -> None:
    remote = RemoteUpstream("https://api.example.com/openai/v1/", KEY)
    assert remote.url == "https://api.example.com/openai"
    assert remote.address == "api.example.com:443"
    assert RemoteUpstream("http://[::1]:8000", None).address == "[::1]:8000"
    assert KEY not in repr(remote)
    with pytest.raises(InvalidRequestError, match="idle_timeout_s must be > 0"):
        RemoteUpstream("http://host", None, idle_timeout_s=0)

    async def proxy_admin() -> None:
        client = RemoteClient(remote)
        try:
            await client.open("/admin/users", {})
        finally:
            await client.aclose()

    with pytest.raises(InvalidRequestError, match="is not proxied"):
        run(proxy_admin())


def test_https_upstream_verified_against_its_ca_bundle(tmp_path: Path) -> None:
    certs = init_certs(tmp_path, hosts=[])
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certs.server_cert, certs.server_key)
    models = b'{"object": "list", "data": []}'

    async def go() -> tuple[bool, bool, UpstreamError | None]:
        async with scripted_server(answer("200 OK", "application/json", models), tls) as server:
            trusting = RemoteClient(RemoteUpstream(server.url, KEY, verify=str(certs.ca_cert)))
            system = RemoteClient(RemoteUpstream(server.url, KEY))
            try:
                error = None
                try:
                    await system.open(CHAT, BODY)
                except UpstreamError as exc:
                    error = exc
                return await trusting.health(), await system.health(), error
            finally:
                await trusting.aclose()
                await system.aclose()

    trusted, untrusted, error = run(go())
    assert (trusted, untrusted) == (True, False)
    assert error is not None
    assert (error.kind, error.retryable) == ("connect", True)
    assert "CERTIFICATE_VERIFY_FAILED" in error.message
    with pytest.raises(ConfigError, match="cannot load the upstream CA bundle"):
        RemoteClient(RemoteUpstream("https://host", None, verify=str(tmp_path / "missing.pem")))
