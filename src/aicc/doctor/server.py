"""`aicc doctor --server URL`: readiness, clock, a one-token completion, and the symptoms in
the server's metrics. Contacts only that URL."""

from __future__ import annotations

import email.utils
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from aicc.cli.client import ssl_reason
from aicc.config import Settings
from aicc.doctor.checks import CheckResult, failed, passed, skipped, warned
from aicc.doctor.symptoms import MetricSnapshot, Scrapes, symptom_checks

SCRAPE_INTERVAL_S = 1.0
"""Between the two /metrics scrapes that measure the server's CPU use."""
CLOCK_WARN_S = 5.0
CLOCK_FAIL_S = 30.0
"""One TOTP step: codes from a phone with the right time fail beyond it."""


@dataclass(frozen=True, slots=True)
class ServerTarget:
    url: str
    """Base URL, e.g. `https://aicc.internal:8443`."""
    api_key: str | None = None
    """Needed for the completion and (unless metrics_public) the metrics."""
    cacert: Path | None = None
    timeout_s: float = 10.0


class _Unreachable(Exception):
    """The server did not answer; `args[0]` says how and what to do."""


def server_checks(target: ServerTarget, settings: Settings | None) -> list[CheckResult]:
    """Readiness, clock skew, completion, metrics and symptoms; after a failed connection the
    rest is skipped."""
    try:
        verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(target.cacert)) if target.cacert else True
        )
    except (OSError, ssl.SSLError) as exc:
        return [failed("server", f"cannot load --cacert {target.cacert}: {exc}", "fix --cacert")]
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    with httpx.Client(
        base_url=target.url.rstrip("/"),
        headers=headers,
        timeout=target.timeout_s,
        verify=verify,
        follow_redirects=False,
    ) as client:
        try:
            return _checks(client, target, settings)
        except _Unreachable as exc:
            why, fix = exc.args
            unreachable = failed("server: ready", why, fix)
            rest = ("server: clock", "server: completion", "server: metrics")
            return [unreachable, *(skipped(name, "the server did not answer") for name in rest)]


def clock_check(server_date: str | None, sent_at: float, received_at: float) -> CheckResult:
    """The server's `Date` header against this machine's clock (midpoint of the request)."""
    if not server_date:
        return skipped("server: clock", "the server sent no Date header")
    try:
        server_time = email.utils.parsedate_to_datetime(server_date).timestamp()
    except (TypeError, ValueError):
        return skipped("server: clock", f"unreadable Date header {server_date!r}")
    # Date has whole seconds: up to 1 s of the difference is the header's rounding.
    skew = server_time - (sent_at + received_at) / 2
    value = f"server clock {skew:+.0f} s from this machine's"
    fix = "run NTP on both machines (chrony, or `timedatectl set-ntp true`)"
    if abs(skew) >= CLOCK_FAIL_S:
        return failed("server: clock", value + ": TOTP codes and certificates fail", fix)
    if abs(skew) >= CLOCK_WARN_S:
        return warned("server: clock", value, fix)
    return passed("server: clock", value)


def _checks(
    client: httpx.Client, target: ServerTarget, settings: Settings | None
) -> list[CheckResult]:
    sent_at = time.time()
    response = _send(client, target, "GET", "/readyz")
    received_at = time.time()
    results = [_readiness(response)]
    results.append(clock_check(response.headers.get("date"), sent_at, received_at))
    results.append(_completion(client, target))
    results += _metrics(client, target, settings)
    return results


def _readiness(response: httpx.Response) -> CheckResult:
    body = _json(response)
    if response.status_code == 200 and body.get("status") == "ready":
        return passed("server: ready", f"ready, serving {body.get('model', '?')}")
    detail = body.get("detail") or body.get("status") or f"HTTP {response.status_code}"
    return failed(
        "server: ready",
        f"not ready: {detail}",
        "the model is loading or the engine stopped: read the server log",
    )


def _completion(client: httpx.Client, target: ServerTarget) -> CheckResult:
    name = "server: completion"
    if not target.api_key:
        return skipped(name, "no --api-key (AICC_API_KEY) to call the API with")
    models = _send(client, target, "GET", "/v1/models")
    if models.status_code != 200:
        return _api_failure(name, models)
    data = _json(models).get("data") or []
    if not data or not isinstance(data[0], dict) or "id" not in data[0]:
        return failed(name, "GET /v1/models lists no model", "check the server's model setting")
    model = str(data[0]["id"])
    body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    started = time.monotonic()
    answer = _send(client, target, "POST", "/v1/completions", json=body)
    elapsed = time.monotonic() - started
    if answer.status_code != 200:
        return _api_failure(name, answer)
    usage = _json(answer).get("usage") or {}
    num_tokens = usage.get("completion_tokens", "?") if isinstance(usage, dict) else "?"
    return passed(name, f"{num_tokens} token from {model} in {elapsed:.2f} s")


def _metrics(
    client: httpx.Client, target: ServerTarget, settings: Settings | None
) -> list[CheckResult]:
    name = "server: metrics"
    response = _send(client, target, "GET", "/metrics")
    if response.status_code != 200:
        if response.status_code == 404:
            result = warned(
                name,
                "metrics are off on this server",
                "set metrics_enabled: true to watch saturation and latency",
            )
        elif response.status_code in (401, 403) and not target.api_key:
            result = skipped(name, "/metrics needs a key with metrics:read (pass --api-key)")
        elif response.status_code == 403:
            result = warned(
                name,
                "this key may not read /metrics: symptoms not checked",
                "pass a key with metrics:read (roles admin, auditor)",
            )
        else:
            result = _api_failure(name, response)
        return [result, skipped("server: symptoms", "no metrics to read")]
    started = time.monotonic()
    time.sleep(SCRAPE_INTERVAL_S)
    second = _send(client, target, "GET", "/metrics")
    elapsed = time.monotonic() - started
    try:
        scrapes = Scrapes(
            MetricSnapshot(response.text), MetricSnapshot(second.text), elapsed, settings
        )
    except ValueError as exc:
        result = failed(name, f"/metrics is not Prometheus text: {exc}", "is this an aicc server?")
        return [result]
    num_lines = len(response.text.splitlines())
    return [passed(name, f"{num_lines} lines of Prometheus text"), *symptom_checks(scrapes)]


def _send(
    client: httpx.Client, target: ServerTarget, method: str, path: str, **kwargs: Any
) -> httpx.Response:
    """Raises _Unreachable with advice when no HTTP answer came back."""
    try:
        return client.request(method, path, **kwargs)
    except httpx.TimeoutException:
        raise _Unreachable(
            f"{target.url} did not answer {path} within {target.timeout_s:.0f} s",
            "check the server's load and the network, or raise --timeout",
        ) from None
    except httpx.TransportError as exc:
        raise _Unreachable(*_transport_advice(target, exc)) from None


def _transport_advice(target: ServerTarget, exc: httpx.TransportError) -> tuple[str, str]:
    reason = ssl_reason(exc)
    if reason is not None:
        if "CERTIFICATE_VERIFY_FAILED" in reason:
            return (
                f"cannot verify the TLS certificate of {target.url} ({reason})",
                "pass --cacert with the CA that signed it (e.g. ca.pem from `aicc certs init`)",
            )
        if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER_FAILURE" in reason:
            return f"{target.url} does not speak TLS", "use an http:// URL"
        return f"TLS with {target.url} failed: {reason}", "check the server's TLS settings"
    if isinstance(exc, httpx.ConnectError):
        return (
            f"nothing answers at {target.url}",
            "start the server (`aicc serve`), or fix the URL, port or firewall",
        )
    return f"lost the connection to {target.url}: {exc}", "read the server log"


def _api_failure(name: str, response: httpx.Response) -> CheckResult:
    error = _json(response).get("error")
    message = error.get("message") if isinstance(error, dict) else None
    value = f"HTTP {response.status_code}: {message or response.reason_phrase}"
    if response.status_code == 401:
        return failed(name, value, "the key was refused: check --api-key (expired or revoked?)")
    if response.status_code == 403:
        return failed(name, value, "the key lacks the permission: use a key with that role")
    if response.status_code in (429, 503):
        return warned(name, value, "the server is saturated or draining: retry, add capacity")
    return failed(name, value, "read the server log for this request")


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
