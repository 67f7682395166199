"""Audit entries → Elastic Common Schema documents (pure mapping; no server)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from aicc.audit.chain import GENESIS_HASH
from aicc.audit.ecs import ECS_VERSION, to_ecs
from aicc.audit.entries import AuditEntry

# Every standard (non-`aicc.*`) leaf field `to_ecs` may write, each one checked against the
# ECS 8.x field reference. A new field outside `aicc.*` must be a real ECS field.
ECS_FIELDS = {
    "@timestamp", "ecs.version", "service.name",
    "event.kind", "event.category", "event.type", "event.action", "event.outcome",
    "event.dataset", "event.sequence", "event.hash", "event.duration",
    "http.request.id", "http.request.method", "http.response.status_code",
    "url.path", "source.address", "source.ip",
    "user.name", "user.id", "user.roles", "error.code", "related.user", "related.hash",
}  # fmt: skip
ECS_CATEGORIES = {"authentication", "configuration", "database", "iam", "process", "web"}
ECS_TYPES = {"access", "change", "creation", "deletion", "denied", "end", "error", "info", "start"}

BODY_SHA = "ab" * 32


def make_entry(**changes: Any) -> AuditEntry:
    entry = AuditEntry(
        seq=0,
        time=datetime(2025, 3, 1, 12, 30, 15, 123456, tzinfo=UTC),
        action="api.call",
        status=200,
        request_id="req-1",
        username="alice",
        user_id=7,
        key_id="key_0123456789ab",
        roles=("user", "auditor"),
        client_addr="127.0.0.1",
        method="POST",
        route="/v1/chat/completions",
        path="/v1/chat/completions",
        model="gemma-3-270m",
        latency_ms=1234.5,
        prompt_tokens=12,
        completion_tokens=34,
        finish_reason="stop",
        body_sha256=BODY_SHA,
    )
    return replace(entry, **changes).chained(5, GENESIS_HASH)


def leaf_paths(document: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, value in document.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            paths |= leaf_paths(value, path + ".")
        else:
            paths.add(path)
    return paths


def test_a_chat_call_maps_to_ecs_fields() -> None:
    entry = make_entry()
    doc = to_ecs(entry)
    assert doc["@timestamp"] == "2025-03-01T12:30:15.123456Z"
    assert doc["ecs"] == {"version": ECS_VERSION}
    assert doc["event"] == {
        "kind": "event",
        "category": ["web"],
        "type": ["access"],
        "action": "api.call",
        "outcome": "success",
        "dataset": "aicc.audit",
        "sequence": 5,
        "hash": entry.hash,
        "duration": 1_234_500_000,
    }
    assert doc["http"] == {
        "request": {"id": "req-1", "method": "POST"},
        "response": {"status_code": 200},
    }
    assert doc["url"] == {"path": "/v1/chat/completions"}
    assert doc["source"] == {"address": "127.0.0.1", "ip": "127.0.0.1"}
    assert doc["user"] == {"name": "alice", "id": "7", "roles": ["user", "auditor"]}
    assert doc["related"] == {"user": ["alice"], "hash": [BODY_SHA]}
    assert doc["aicc"] == {
        "route": "/v1/chat/completions",
        "key_id": "key_0123456789ab",
        "model": "gemma-3-270m",
        "tokens": {"prompt": 12, "completion": 34},
        "finish_reason": "stop",
        "request": {"body_sha256": BODY_SHA},
        "audit": {"seq": 5, "hash": entry.hash, "prev_hash": GENESIS_HASH},
    }
    assert "error" not in doc  # None values and emptied objects are left out


def test_only_ecs_fields_outside_the_aicc_namespace() -> None:
    entries = [
        make_entry(),
        make_entry(
            status=401,
            error_code="invalid_api_key",
            username=None,
            user_id=None,
            roles=(),
            key_id=None,
            route="/v1/models",
            method="GET",
        ),
        make_entry(
            action="audit.purge",
            route=None,
            path=None,
            method=None,
            client_addr=None,
            detail={"before": "2025-01-01T00:00:00Z", "purged": 3},
        ),
    ]
    for entry in entries:
        doc = to_ecs(entry)
        standard = {path for path in leaf_paths(doc) if not path.startswith("aicc.")}
        assert standard <= ECS_FIELDS, standard - ECS_FIELDS
        assert set(doc["event"]["category"]) <= ECS_CATEGORIES
        assert set(doc["event"]["type"]) <= ECS_TYPES
        # One line of JSON Lines: serialisable as is.
        assert json.loads(json.dumps(doc)) == doc


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "success"),
        (201, "success"),
        (400, "failure"),
        (401, "failure"),
        (429, "failure"),
        (500, "failure"),
        (499, "unknown"),
        (0, "unknown"),
    ],
)
def test_outcome_follows_the_status(status: int, outcome: str) -> None:
    assert to_ecs(make_entry(status=status))["event"]["outcome"] == outcome


@pytest.mark.parametrize(
    ("method", "route", "status", "category", "types"),
    [
        ("POST", "/v1/chat/completions", 200, "web", ["access"]),
        ("POST", "/v1/chat/completions", 503, "web", ["access", "error"]),
        ("GET", "/v1/models", 401, "web", ["access", "denied"]),
        ("POST", "/v1/completions", 429, "web", ["access", "denied"]),
        ("POST", "/auth/login", 200, "authentication", ["start"]),
        ("POST", "/auth/login", 401, "authentication", ["start", "denied"]),
        ("POST", "/auth/logout", 200, "authentication", ["end"]),
        ("POST", "/admin/users", 201, "iam", ["creation"]),
        ("PATCH", "/admin/users/{username}", 200, "iam", ["change"]),
        ("DELETE", "/admin/keys/{key_id}", 200, "iam", ["deletion"]),
        ("GET", "/admin/roles", 403, "iam", ["info", "denied"]),
        ("GET", "/admin/config", 200, "configuration", ["info"]),
        ("GET", "/admin/audit", 200, "database", ["access"]),
    ],
)
def test_category_and_type_follow_route_method_and_status(
    method: str, route: str, status: int, category: str, types: list[str]
) -> None:
    event = to_ecs(make_entry(method=method, route=route, status=status))["event"]
    assert (event["category"], event["type"]) == ([category], types)


def test_server_events_are_not_web_calls() -> None:
    purge = make_entry(
        action="audit.purge", route=None, path=None, method=None, detail={"purged": 3}
    )
    doc = to_ecs(purge)
    assert doc["event"]["category"] == ["database"]
    assert doc["event"]["type"] == ["deletion"]
    assert doc["event"]["action"] == "audit.purge"
    assert doc["aicc"]["detail"] == {"purged": 3}
    assert "url" not in doc
    assert "method" not in doc["http"]["request"]


def test_source_ip_only_when_the_address_is_an_ip() -> None:
    assert to_ecs(make_entry(client_addr="::1"))["source"] == {"address": "::1", "ip": "::1"}
    # A Unix socket peer or proxy name is kept as the address, never as an (invalid) ip.
    assert to_ecs(make_entry(client_addr="unix:/run/aicc.sock"))["source"] == {
        "address": "unix:/run/aicc.sock"
    }
    assert "source" not in to_ecs(make_entry(client_addr=None))


def test_sealed_content_and_session_ids_are_exported_as_stored() -> None:
    doc = to_ecs(
        make_entry(
            prompt_enc="cHJvbXB0",
            completion_enc="Y29tcGw=",
            key_id=None,
            session_id="ses_0123456789ab",
        )
    )
    assert doc["aicc"]["content"] == {"prompt_enc": "cHJvbXB0", "completion_enc": "Y29tcGw="}
    assert doc["aicc"]["session_id"] == "ses_0123456789ab"
    assert "key_id" not in doc["aicc"]


def test_the_exported_hash_is_the_entrys_chain_hash() -> None:
    entry = make_entry()
    doc = to_ecs(entry)
    assert doc["event"]["hash"] == entry.compute_hash() == doc["aicc"]["audit"]["hash"]
