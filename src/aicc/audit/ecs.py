"""Audit entries as Elastic Common Schema documents, for `aicc audit export` and ELK/Filebeat.

Standard ECS fields where ECS has one (`@timestamp`, `event.*`, `http.*`, `url.path`,
`source.*`, `user.*`, `error.code`); everything aicc-specific lives under the custom `aicc.*`
namespace, which ECS reserves for exactly that. The chain hash goes to `event.hash` (ECS: "hash
of the raw event, to demonstrate log integrity") and, with `seq` and `prev_hash`, to
`aicc.audit.*`, so that an exported stream can still be checked link by link.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from aicc.audit.chain import format_time
from aicc.audit.entries import AuditEntry

ECS_VERSION = "8.11.0"
DATASET = "aicc.audit"

# Route prefixes → ECS `event.category` (allowed values only). Anything else is a web call.
_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("/auth/login", "authentication"),
    ("/auth/logout", "authentication"),
    ("/auth/password", "iam"),
    ("/auth/totp", "iam"),
    ("/auth/keys", "iam"),
    ("/admin/users", "iam"),
    ("/admin/keys", "iam"),
    ("/admin/roles", "iam"),
    ("/admin/config", "configuration"),
    ("/admin/audit", "database"),
)
_CHANGE_TYPES = {"POST": "creation", "PUT": "change", "PATCH": "change", "DELETE": "deletion"}
_DENIED = frozenset({401, 403, 429})
_CLIENT_GONE = 499
_UNKNOWN = 0
"""The status of a call the server did not finish (recovered after a crash)."""


def to_ecs(entry: AuditEntry) -> dict[str, Any]:
    """One entry as a nested ECS document (fields that are None are left out)."""
    category, kind = _categorize(entry)
    event = {
        "kind": "event",
        "category": [category],
        "type": kind,
        "action": entry.action,
        "outcome": _outcome(entry.status),
        "dataset": DATASET,
        "sequence": entry.seq,
        "hash": entry.hash,
        "duration": _nanoseconds(entry.latency_ms),
    }
    document: dict[str, Any] = {
        "@timestamp": format_time(entry.time),
        "ecs": {"version": ECS_VERSION},
        "service": {"name": "aicc"},
        "event": event,
        "http": {
            "request": {"id": entry.request_id, "method": entry.method},
            "response": {"status_code": entry.status},
        },
        "url": {"path": entry.path},
        "source": _source(entry.client_addr),
        "user": {
            "name": entry.username,
            "id": None if entry.user_id is None else str(entry.user_id),
            "roles": list(entry.roles) or None,
        },
        "error": {"code": entry.error_code},
        "related": {
            "user": [entry.username] if entry.username else None,
            "hash": [entry.body_sha256] if entry.body_sha256 else None,
        },
        "aicc": {
            "route": entry.route,
            "key_id": entry.key_id,
            "session_id": entry.session_id,
            "model": entry.model,
            "tokens": {"prompt": entry.prompt_tokens, "completion": entry.completion_tokens},
            "finish_reason": entry.finish_reason,
            "request": {"body_sha256": entry.body_sha256},
            "detail": entry.detail or None,
            "content": {"prompt_enc": entry.prompt_enc, "completion_enc": entry.completion_enc},
            "audit": {"seq": entry.seq, "hash": entry.hash, "prev_hash": entry.prev_hash},
        },
    }
    pruned: dict[str, Any] = _prune(document)
    return pruned


def _categorize(entry: AuditEntry) -> tuple[str, list[str]]:
    """(`event.category`, `event.type`) of an entry, by route and method."""
    route = entry.route or entry.path or ""
    category = "web"
    for prefix, name in _CATEGORIES:
        if route.startswith(prefix):
            category = name
            break
    if entry.action != "api.call" and not route:
        # Events the server records itself (purge, crash recovery, start-up): not HTTP calls.
        category = "database" if entry.action.startswith("audit.") else "process"
    method = (entry.method or "").upper()
    if category == "authentication":
        kinds = ["end" if route.startswith("/auth/logout") else "start"]
    elif category == "web":
        kinds = ["access"]
    elif entry.action == "audit.purge":
        kinds = ["deletion"]
    else:
        kinds = [_CHANGE_TYPES.get(method, "info" if category != "database" else "access")]
    if entry.status in _DENIED:
        kinds.append("denied")
    elif entry.status >= 500:
        kinds.append("error")
    return category, kinds


def _outcome(status: int) -> str:
    if status in (_CLIENT_GONE, _UNKNOWN):
        # The client went away, or the server stopped first: neither success nor failure.
        return "unknown"
    return "success" if status < 400 else "failure"


def _nanoseconds(latency_ms: float | None) -> int | None:
    return None if latency_ms is None else round(latency_ms * 1_000_000)


def _source(client_addr: str | None) -> dict[str, Any]:
    """`source.address` as recorded; `source.ip` only when it parses as an IP (ES maps it as
    type `ip` and rejects a document whose value is not one)."""
    if not client_addr:
        return {}
    try:
        ip: str | None = str(ipaddress.ip_address(client_addr))
    except ValueError:
        ip = None
    return {"address": client_addr, "ip": ip}


def _prune(value: Any) -> Any:
    """The document without None values and without objects left empty by that."""
    if isinstance(value, dict):
        pruned = {key: _prune(item) for key, item in value.items() if item is not None}
        return {key: item for key, item in pruned.items() if item != {}}
    return value
