"""/admin/audit on live servers: who may read and purge, filters, pages, the ECS export."""

from __future__ import annotations

import hashlib
import itertools
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import ADMIN_KEY, LiveServer, start_server

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def audit_server(model_dir: Path) -> Iterator[LiveServer]:
    """Default retention (180 days, not forced); the admin may read (`audit_admin_read`)."""
    live = start_server(model_dir, max_batch_size=2, ctx_size=1024, audit_admin_read=True)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def forced_server(model_dir: Path) -> Iterator[LiveServer]:
    """A one-day retention, forced; only auditors read."""
    live = start_server(
        model_dir,
        max_batch_size=2,
        ctx_size=1024,
        audit_retention_days=1,
        audit_retention_force=True,
    )
    yield live
    live.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def get(server: LiveServer, path: str, key: str, **params: Any) -> httpx.Response:
    return httpx.get(server.base_url + path, headers=bearer(key), params=params, timeout=60)


def entries(server: LiveServer, key: str, **params: Any) -> list[dict[str, Any]]:
    """Every entry matching `params`, following `next_after_seq`."""
    found: list[dict[str, Any]] = []
    while True:
        response = get(server, "/admin/audit", key, **params)
        assert response.status_code == 200, response.text
        page = response.json()
        found += page["data"]
        if page["next_after_seq"] is None:
            return found
        params["after_seq"] = page["next_after_seq"]


def test_a_chat_call_is_one_entry_with_its_fields(audit_server: LiveServer) -> None:
    username = new_name("chat")
    user_key = audit_server.create_user_key(username)
    auditor = audit_server.create_user_key(new_name("auditor"), ("auditor",))
    body = json.dumps(
        {
            "model": BUNDLED_MODEL_NAME,
            "max_tokens": 3,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Say hi"}],
        }
    ).encode()
    response = httpx.post(
        audit_server.base_url + "/v1/chat/completions",
        content=body,
        headers={**bearer(user_key), "Content-Type": "application/json", "X-Request-ID": "r-42"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    usage = answer["usage"]

    # Committed before the response's last byte: readable at once, no waiting.
    (entry,) = entries(audit_server, auditor, user=username)
    assert entry["action"] == "api.call"
    assert entry["method"] == "POST"
    assert entry["route"] == entry["path"] == "/v1/chat/completions"
    assert entry["status"] == 200
    assert entry["model"] == BUNDLED_MODEL_NAME
    assert entry["prompt_tokens"] == usage["prompt_tokens"]
    assert entry["completion_tokens"] == usage["completion_tokens"]
    assert entry["finish_reason"] == answer["choices"][0]["finish_reason"]
    assert entry["roles"] == ["user"]
    assert entry["key_id"].startswith("key_")
    assert entry["request_id"] == "r-42"
    assert entry["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert entry["client_addr"] == "127.0.0.1"
    assert entry["latency_ms"] > 0
    assert len(entry["hash"]) == len(entry["prev_hash"]) == 64
    assert entry["prompt_enc"] is None  # content capture is off by default


def test_only_auditors_read_and_the_admin_when_configured(
    audit_server: LiveServer, forced_server: LiveServer
) -> None:
    auditor = audit_server.create_user_key(new_name("auditor"), ("auditor",))
    user = audit_server.create_user_key(new_name("user"))
    security = audit_server.create_user_key(new_name("sec"), ("security",))
    for path in ("/admin/audit", "/admin/audit/export"):
        assert get(audit_server, path, auditor).status_code == 200
        assert get(audit_server, path, user).status_code == 403
        assert get(audit_server, path, security).status_code == 403
        assert get(audit_server, path, "aicc-sk-NotAKey0123456789abcdef").status_code == 401
        # `audit_admin_read: true` on this server, false on the other.
        assert get(audit_server, path, ADMIN_KEY).status_code == 200
        assert get(forced_server, path, ADMIN_KEY).status_code == 403
    # Reading is not purging: the auditor cannot delete anything.
    old = (datetime.now(UTC) - timedelta(days=400)).isoformat()
    response = httpx.post(
        audit_server.base_url + "/admin/audit/purge",
        json={"before": old},
        headers=bearer(auditor),
        timeout=30,
    )
    assert response.status_code == 403


def test_filters_by_user_status_model_and_time(audit_server: LiveServer) -> None:
    username = new_name("filter")
    user_key = audit_server.create_user_key(username)
    auditor = audit_server.create_user_key(new_name("auditor"), ("auditor",))
    before = datetime.now(UTC) - timedelta(seconds=1)
    assert get(audit_server, "/v1/models", user_key).status_code == 200
    assert get(audit_server, "/admin/users", user_key).status_code == 403
    tokens = {"model": BUNDLED_MODEL_NAME, "content": "hello"}
    response = httpx.post(
        audit_server.base_url + "/tokenize", json=tokens, headers=bearer(user_key), timeout=30
    )
    assert response.status_code == 200, response.text

    mine = entries(audit_server, auditor, user=username)
    assert [e["path"] for e in mine] == ["/v1/models", "/admin/users", "/tokenize"]
    assert [e["seq"] for e in mine] == sorted(e["seq"] for e in mine)
    (denied,) = entries(audit_server, auditor, user=username, status=403)
    assert denied["path"] == "/admin/users"
    assert denied["error_code"] == "permission_denied"
    (tokenized,) = entries(audit_server, auditor, user=username, model=BUNDLED_MODEL_NAME)
    assert tokenized["path"] == "/tokenize"
    assert len(entries(audit_server, auditor, user=username, since=before.isoformat())) == 3
    assert entries(audit_server, auditor, user=username, until=before.isoformat()) == []
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert entries(audit_server, auditor, user=username, since=future) == []
    # A time without a zone is UTC.
    naive = before.replace(tzinfo=None).isoformat()
    assert len(entries(audit_server, auditor, user=username, since=naive)) == 3


def test_pages_follow_next_after_seq(audit_server: LiveServer) -> None:
    username = new_name("pages")
    user_key = audit_server.create_user_key(username)
    auditor = audit_server.create_user_key(new_name("auditor"), ("auditor",))
    for _ in range(5):
        assert get(audit_server, "/v1/models", user_key).status_code == 200
    seen: list[int] = []
    params: dict[str, Any] = {"user": username, "limit": 2}
    pages = 0
    while True:
        page = get(audit_server, "/admin/audit", auditor, **params).json()
        assert page["object"] == "list"
        assert len(page["data"]) <= 2
        seen += [entry["seq"] for entry in page["data"]]
        pages += 1
        if page["next_after_seq"] is None:
            break
        assert page["next_after_seq"] == page["data"][-1]["seq"]
        params["after_seq"] = page["next_after_seq"]
    assert pages == 3
    assert len(seen) == len(set(seen)) == 5
    assert seen == sorted(seen)


@pytest.mark.parametrize(
    "params",
    [{"limit": 1001}, {"limit": 0}, {"since": "yesterday"}, {"status": 600}, {"after_seq": -1}],
)
def test_bad_filters_are_400(audit_server: LiveServer, params: dict[str, Any]) -> None:
    auditor = audit_server.create_user_key(new_name("auditor"), ("auditor",))
    response = get(audit_server, "/admin/audit", auditor, **params)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == f"query.{next(iter(params))}"


def test_export_is_ecs_json_lines(audit_server: LiveServer) -> None:
    username = new_name("export")
    user_key = audit_server.create_user_key(username)
    auditor = audit_server.create_user_key(new_name("auditor"), ("auditor",))
    for _ in range(3):
        assert get(audit_server, "/v1/models", user_key).status_code == 200
    assert get(audit_server, "/admin/config", user_key).status_code == 403
    listed = entries(audit_server, auditor, user=username)

    response = get(audit_server, "/admin/audit/export", auditor, user=username)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert response.text.endswith("\n")
    documents = [json.loads(line) for line in response.text.splitlines()]
    assert [doc["aicc"]["audit"]["seq"] for doc in documents] == [e["seq"] for e in listed]
    for doc, entry in zip(documents, listed, strict=True):
        assert doc["ecs"]["version"]
        assert doc["event"]["kind"] == "event"
        assert doc["event"]["hash"] == entry["hash"]
        assert doc["event"]["sequence"] == entry["seq"]
        assert doc["user"]["name"] == username
        assert doc["http"]["request"]["method"] == "GET"
        assert doc["http"]["response"]["status_code"] == entry["status"]
        assert doc["url"]["path"] == entry["path"]
        assert doc["source"]["ip"] == "127.0.0.1"
    assert [doc["event"]["outcome"] for doc in documents] == [
        "success",
        "success",
        "success",
        "failure",
    ]
    limited = get(audit_server, "/admin/audit/export", auditor, user=username, limit=2)
    assert len(limited.text.splitlines()) == 2
    after = get(
        audit_server, "/admin/audit/export", auditor, after_seq=listed[-1]["seq"] - 1, user=username
    )
    assert [json.loads(line)["event"]["sequence"] for line in after.text.splitlines()] == [
        listed[-1]["seq"]
    ]


def test_purge_is_refused_within_the_retention(audit_server: LiveServer) -> None:
    recent = (datetime.now(UTC) - timedelta(days=30)).isoformat()
    response = httpx.post(
        audit_server.base_url + "/admin/audit/purge",
        json={"before": recent},
        headers=ADMIN,
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "before"
    assert "180 days" in response.json()["error"]["message"]
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    response = httpx.post(
        audit_server.base_url + "/admin/audit/purge",
        json={"before": future},
        headers=ADMIN,
        timeout=30,
    )
    assert response.status_code == 400
    # Older than the retention: allowed (nothing that old here), and audited.
    old = (datetime.now(UTC) - timedelta(days=181)).isoformat()
    response = httpx.post(
        audit_server.base_url + "/admin/audit/purge",
        json={"before": old},
        headers=ADMIN,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"purged": 0}


def test_forced_purge_deletes_and_is_audited(forced_server: LiveServer) -> None:
    username = new_name("purged")
    user_key = forced_server.create_user_key(username)
    auditor = forced_server.create_user_key(new_name("auditor"), ("auditor",))
    for _ in range(3):
        assert get(forced_server, "/v1/models", user_key).status_code == 200
    assert len(entries(forced_server, auditor, user=username)) == 3
    cut = datetime.now(UTC)
    response = httpx.post(
        forced_server.base_url + "/admin/audit/purge",
        json={"before": cut.isoformat()},
        headers=ADMIN,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["purged"] >= 3
    assert entries(forced_server, auditor, user=username) == []
    remaining = entries(forced_server, auditor, limit=1000)
    purges = [entry for entry in remaining if entry["action"] == "audit.purge"]
    assert purges, remaining
    assert purges[-1]["username"] == "admin"
    # The chain continues from the cut: each remaining entry links to the one before it.
    for previous, entry in itertools.pairwise(remaining):
        assert entry["seq"] == previous["seq"] + 1
        assert entry["prev_hash"] == previous["hash"]


def test_audit_on_postgresql(model_dir: Path, postgres_url: str) -> None:
    live = start_server(model_dir, max_batch_size=2, ctx_size=1024, database_url=postgres_url)
    try:
        username = new_name("pg")
        user_key = live.create_user_key(username)
        auditor = live.create_user_key(new_name("auditor"), ("auditor",))
        since = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
        assert get(live, "/v1/models", user_key).status_code == 200
        assert get(live, "/admin/users", user_key).status_code == 403
        mine = entries(live, auditor, user=username, since=since)
        assert [(e["path"], e["status"]) for e in mine] == [
            ("/v1/models", 200),
            ("/admin/users", 403),
        ]
        export = get(live, "/admin/audit/export", auditor, user=username, status=403)
        (line,) = export.text.splitlines()
        assert json.loads(line)["event"]["outcome"] == "failure"
    finally:
        live.stop()
