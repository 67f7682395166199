"""User feedback per variant through a real gateway: a deployment whose variant `a` is the
gateway's own model and `b` another aicc on loopback. Ratings of one's own calls are stored
with the variant the audit log recorded, counted in the metrics, audited; replacements,
other users' and unknown calls, bad bodies, permissions, the admin summary and the CLI."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import select, text

from aicc.api.feedback import FeedbackStore, RatedCall, call_query
from aicc.auth.principal import Limits, Principal
from aicc.cli.main import main
from aicc.db import Database
from aicc.db.models import FeedbackRow, User
from tests.conftest import ADMIN_KEY, LiveServer, start_server

KEY_ENV = "AICC_TEST_FEEDBACK_UPSTREAM_KEY"
SMALL = {"threads": 1, "max_batch_size": 4, "ctx_size": 1024}


class Setup:
    def __init__(self, model_dir: Path) -> None:
        os.environ[KEY_ENV] = ADMIN_KEY
        self.upstream = start_server(model_dir, served_model_name="base", **SMALL)
        remote = {"url": self.upstream.base_url, "model": "base", "api_key_env": KEY_ENV}
        deployments = [
            {"model": "ab", "variants": [
                {"name": "a", "weight": 50, "replicas": [{"local": "gateway-model"}]},
                {"name": "b", "weight": 50, "replicas": [remote]}]},
        ]  # fmt: skip
        self.gateway = start_server(
            model_dir,
            served_model_name="gateway-model",
            deployments=deployments,
            audit_admin_read=True,
            health_check_s=0.5,
            **SMALL,
        )
        self.admin = httpx.Client(
            base_url=self.gateway.base_url, headers=self.gateway.headers, timeout=30
        )

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.gateway.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    @property
    def db(self) -> Database:
        database: Database = self.gateway.app.state.audit.db
        return database

    def close(self) -> None:
        self.admin.close()
        self.gateway.stop()
        self.upstream.stop()
        os.environ.pop(KEY_ENV, None)


@pytest.fixture(scope="module")
def setup(model_dir: Path) -> Iterator[Setup]:
    live = Setup(model_dir)
    yield live
    live.close()


def call(client: httpx.Client, request_id: str, model: str = "ab", **headers: str) -> str:
    """One chat call with this request id; the variant that served it ("" if none)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    response = client.post(
        "/v1/chat/completions", json=body, headers={"X-Request-ID": request_id, **headers}
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == request_id
    variant: str = response.headers.get("x-aicc-variant", "")
    return variant


def rate(client: httpx.Client, request_id: str, rating: Any, **fields: Any) -> httpx.Response:
    return client.post("/v1/feedback", json={"request_id": request_id, "rating": rating, **fields})


def feedback_count(server: LiveServer, rating: str, variant: str, model: str = "ab") -> float:
    metrics = server.app.state.metrics
    value = metrics.registry.get_sample_value(
        "aicc_feedback_total", {"model": model, "variant": variant, "rating": rating}
    )
    return 0.0 if value is None else float(value)


def audit_detail(setup: Setup, request_id: str) -> dict[str, Any]:
    """The audit detail of the feedback call whose response carried `request_id`."""
    entries = setup.admin.get("/admin/audit", params={"limit": 1000}).json()["data"]
    (entry,) = [e for e in entries if e["request_id"] == request_id]
    assert entry["route"] == "/v1/feedback"
    detail: dict[str, Any] = entry["detail"]
    return detail


def stored(setup: Setup, request_id: str) -> list[FeedbackRow]:
    with setup.db.session() as session:
        rows = session.scalars(select(FeedbackRow).where(FeedbackRow.request_id == request_id))
        return list(rows)


def test_rating_a_routed_call_stores_counts_and_audits_its_variant(setup: Setup) -> None:
    for variant in ("a", "b"):
        request_id = f"fb-routed-{variant}"
        assert call(setup.admin, request_id, **{"X-AICC-Variant": variant}) == variant
        before = feedback_count(setup.gateway, "positive", variant)
        response = rate(setup.admin, request_id, 1, comment="concise and right")
        assert response.status_code == 200, response.text
        assert response.json() == {
            "object": "feedback", "request_id": request_id, "model": "ab",
            "variant": variant, "rating": 1,
        }  # fmt: skip
        (row,) = stored(setup, request_id)
        assert (row.model, row.variant, row.rating) == ("ab", variant, 1)
        assert row.comment == "concise and right"
        assert feedback_count(setup.gateway, "positive", variant) == before + 1
        detail = audit_detail(setup, response.headers["x-request-id"])
        assert detail == {"request_id": request_id, "rating": 1, "model": "ab", "variant": variant}
    exposition = setup.admin.get("/metrics").text
    assert 'aicc_feedback_total{model="ab",rating="positive",variant="b"}' in exposition


def test_a_second_rating_replaces_the_first(setup: Setup) -> None:
    call(setup.admin, "fb-replace", **{"X-AICC-Variant": "b"})
    positive, negative = (feedback_count(setup.gateway, r, "b") for r in ("positive", "negative"))
    assert rate(setup.admin, "fb-replace", 1).status_code == 200
    changed = rate(setup.admin, "fb-replace", -1, comment="on reflection, wrong")
    assert changed.status_code == 200, changed.text
    assert changed.json()["rating"] == -1
    (row,) = stored(setup, "fb-replace")
    assert (row.rating, row.comment) == (-1, "on reflection, wrong")
    # The same rating again changes nothing that is counted.
    assert rate(setup.admin, "fb-replace", -1).status_code == 200
    (row,) = stored(setup, "fb-replace")
    assert row.comment is None
    assert feedback_count(setup.gateway, "positive", "b") == positive + 1
    assert feedback_count(setup.gateway, "negative", "b") == negative + 1


def test_concurrent_first_ratings_keep_one_row(setup: Setup) -> None:
    call(setup.admin, "fb-race", **{"X-AICC-Variant": "a"})
    with ThreadPoolExecutor(4) as pool:
        statuses = list(
            pool.map(lambda r: rate(setup.admin, "fb-race", r).status_code, [1, -1] * 4)
        )
    assert statuses == [200] * 8
    assert len(stored(setup, "fb-race")) == 1


def test_the_variant_comes_from_the_audit_log_not_the_client(setup: Setup) -> None:
    alice = setup.gateway.create_user_key("fb-alice")
    with setup.client(alice) as client:
        variant = call(client, "fb-alice-1")
        claimed = rate(client, "fb-alice-1", 1, variant="a" if variant == "b" else "b")
        assert claimed.status_code == 400
        assert claimed.json()["error"]["param"] == "variant"
        answer = rate(client, "fb-alice-1", 1)
        assert answer.status_code == 200, answer.text
        assert answer.json()["variant"] == variant
        # A call to a model served directly carries no variant.
        call(client, "fb-alice-direct", model="gateway-model")
        direct = rate(client, "fb-alice-direct", -1)
        assert direct.status_code == 200, direct.text
        assert (direct.json()["model"], direct.json()["variant"]) == ("gateway-model", "")


def test_another_users_call_or_an_unknown_id_is_not_found(setup: Setup) -> None:
    alice = setup.gateway.create_user_key("fb-alice")
    bob = setup.gateway.create_user_key("fb-bob")
    with setup.client(alice) as client:
        call(client, "fb-alice-private")
    answers = []
    with setup.client(bob) as client:
        for request_id in ("fb-alice-private", "fb-never-sent"):
            response = rate(client, request_id, -1)
            assert response.status_code == 404, response.text
            error = response.json()["error"]
            assert (error["type"], error["code"], error["param"]) == (
                "invalid_request_error", "not_found", "request_id",
            )  # fmt: skip
            answers.append(error["message"].replace(request_id, "ID"))
    assert answers[0] == answers[1]  # another user's call reads as no call at all
    assert stored(setup, "fb-alice-private") == []
    # The feedback call itself is an api.call with an id, but it names no model: not ratable.
    first = rate(setup.admin, "fb-never-sent", 1)
    assert rate(setup.admin, first.headers["x-request-id"], 1).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"request_id": "x", "rating": 0},
        {"request_id": "x", "rating": 2},
        {"request_id": "x", "rating": True},
        {"request_id": "x", "rating": "1"},
        {"request_id": "x", "rating": 1.0},
        {"request_id": "", "rating": 1},
        {"request_id": "x" * 129, "rating": 1},
        {"request_id": "x", "rating": 1, "comment": "x" * 2001},
        {"request_id": "x", "rating": 1, "model": "ab"},
        {"rating": 1},
        {"request_id": "x"},
        ["request_id", "x"],
    ],
)
def test_bad_bodies_are_refused(setup: Setup, body: Any) -> None:
    response = setup.admin.post("/v1/feedback", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_non_json_body_is_refused(setup: Setup) -> None:
    response = setup.admin.post(
        "/v1/feedback", content=b"{rating", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_rating_needs_the_inference_permission(setup: Setup) -> None:
    narrow = setup.gateway.create_user_key("fb-carol", scopes=["keys:self"])
    auditor = setup.gateway.create_user_key("fb-auditor", ("auditor",))
    for key in (narrow, auditor):
        with setup.client(key) as client:
            response = rate(client, "fb-routed-a", 1)
            assert response.status_code == 403, response.text
            assert response.json()["error"]["type"] == "permission_error"
    with httpx.Client(base_url=setup.gateway.base_url) as anonymous:
        assert rate(anonymous, "fb-routed-a", 1).status_code == 401


def test_admin_summary_per_variant(setup: Setup) -> None:
    for name, variant, rating in [("s1", "a", 1), ("s2", "a", 1), ("s3", "a", -1), ("s4", "b", 1)]:
        call(setup.admin, f"fb-sum-{name}", model="ab", **{"X-AICC-Variant": variant})
        assert rate(setup.admin, f"fb-sum-{name}", rating).status_code == 200
    with setup.db.session() as session:
        counts = {
            (variant, rating): n
            for variant, rating, n in session.execute(
                text(
                    "SELECT variant, rating, count(*) FROM feedback WHERE model = 'ab' "
                    "GROUP BY variant, rating"
                )
            )
        }
    response = setup.admin.get("/admin/deployments/ab/feedback")
    assert response.status_code == 200, response.text
    summary = response.json()
    assert (summary["object"], summary["model"]) == ("list", "ab")
    by_variant = {row["variant"]: row for row in summary["data"]}
    assert set(by_variant) == {"a", "b"}
    for variant, row in by_variant.items():
        positive, negative = counts.get((variant, 1), 0), counts.get((variant, -1), 0)
        assert (row["positive"], row["negative"]) == (positive, negative)
        assert row["total"] == positive + negative
        assert row["positive_ratio"] == pytest.approx(positive / (positive + negative))
    assert by_variant["a"]["positive"] >= 2
    assert by_variant["a"]["negative"] >= 1
    # Later than every rating: the deployment's variants, at zero.
    later = (datetime.now(UTC) + timedelta(hours=1)).replace(tzinfo=None).isoformat()
    empty = setup.admin.get("/admin/deployments/ab/feedback", params={"since": later}).json()
    assert empty["data"] == [
        {"variant": v, "positive": 0, "negative": 0, "total": 0, "positive_ratio": None}
        for v in ("a", "b")
    ]
    direct = setup.admin.get("/admin/deployments/gateway-model/feedback").json()["data"]
    assert [row["variant"] for row in direct] == [""]
    assert setup.admin.get("/admin/deployments/ab/feedback?since=yesterday").status_code == 400


def test_summary_needs_config_read(setup: Setup) -> None:
    user = setup.gateway.create_user_key("fb-alice")
    with setup.client(user) as client:
        response = client.get("/admin/deployments/ab/feedback")
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"


def test_cli_prints_the_summary(setup: Setup) -> None:
    call(setup.admin, "fb-cli", **{"X-AICC-Variant": "b"})
    assert rate(setup.admin, "fb-cli", 1).status_code == 200
    env = {"AICC_SERVER": setup.gateway.base_url, "AICC_API_KEY": ADMIN_KEY}
    result = CliRunner(env=env).invoke(main, ["deploy", "feedback", "ab"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["VARIANT", "POSITIVE", "NEGATIVE", "TOTAL", "POSITIVE", "%"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert set(rows) == {"a", "b"}
    assert int(rows["b"][0]) >= 1
    assert rows["b"][3].endswith("%")
    missing = CliRunner(env=env).invoke(main, ["deploy", "feedback", "ab", "--since", "soon"])
    assert missing.exit_code != 0
    assert "Traceback" not in missing.output


def admin_principal(setup: Setup) -> Principal:
    with setup.db.session() as session:
        user_id = session.scalars(select(User.id).where(User.username == "admin")).one()
    return Principal(user_id, "admin", ("admin",), frozenset(), ("*",), "key", "key_x", Limits())


def test_calls_outside_the_window_are_not_found(setup: Setup) -> None:
    call(setup.admin, "fb-window", **{"X-AICC-Variant": "a"})
    admin = admin_principal(setup)
    store = FeedbackStore(setup.db)
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    assert store.find_call(admin, "fb-window", hour_ago) == RatedCall("ab", "a")
    assert store.find_call(admin, "fb-window", datetime.now(UTC) + timedelta(seconds=1)) is None


def test_the_call_lookup_uses_an_audit_index(setup: Setup) -> None:
    """The audit log has no request-id index: the lookup must start from username or time."""
    statement = call_query(admin_principal(setup), "fb-plan", datetime.now(UTC))
    compiled = statement.compile(dialect=setup.db.engine.dialect)
    params = tuple("2025-01-01 00:00:00.000000" for _ in compiled.positiontup or ())
    with setup.db.engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params).all()
    plan = " | ".join(str(row[-1]) for row in rows)
    assert "ix_audit_log_username" in plan or "ix_audit_log_time" in plan, plan
    assert "TEMP B-TREE" not in plan, plan
