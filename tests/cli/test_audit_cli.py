"""`aicc audit query|export|purge` against a live server, and `aicc audit verify` on copies of
its state (database snapshot, checkpoint file, secret), clean and tampered."""

from __future__ import annotations

import json
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from aicc.cli.audit import parse_when
from aicc.cli.main import main
from tests.conftest import ADMIN_KEY, LiveServer, start_server


@pytest.fixture(scope="module")
def live(model_dir: Path) -> Iterator[LiveServer]:
    """A one-day retention, forced, so that a purge of everything up to now is allowed."""
    server = start_server(
        model_dir,
        max_batch_size=2,
        ctx_size=1024,
        audit_retention_days=1,
        audit_retention_force=True,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auditor_key(live: LiveServer) -> str:
    return live.create_user_key(f"auditor-{uuid.uuid4().hex[:6]}", ("auditor",))


@pytest.fixture
def aicc(live: LiveServer, tmp_path: Path) -> Any:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "AICC_SERVER": live.base_url,
           "AICC_API_KEY": None, "AICC_CACERT": None}  # fmt: skip

    def run(*args: str, key: str | None = None, stdin: str | None = None) -> Result:
        extra = ("--api-key", key) if key is not None else ()
        return CliRunner(env=env).invoke(main, ["audit", *args, *extra], input=stdin)

    return run


def user_with_calls(live: LiveServer, num_calls: int) -> str:
    username = f"cli-{uuid.uuid4().hex[:8]}"
    key = live.create_user_key(username)
    for _ in range(num_calls):
        response = httpx.get(
            live.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200
    return username


def snapshot_state(live: LiveServer, dest: Path) -> Path:
    """A consistent copy of the server's audit state: SQLite's online backup (the WAL
    included), the checkpoint file and the secret."""
    state_dir: Path = live.app.state.settings.state_dir
    dest.mkdir()
    source = sqlite3.connect(state_dir / "aicc.db")
    target = sqlite3.connect(dest / "aicc.db")
    with target:
        source.backup(target)
    source.close()
    target.close()
    for name in ("audit-checkpoints.jsonl", "secret.key"):
        if (state_dir / name).exists():
            shutil.copy2(state_dir / name, dest / name)
    return dest


def tamper(state_dir: Path, statement: str) -> None:
    with sqlite3.connect(state_dir / "aicc.db") as connection:
        connection.execute(statement)
    connection.close()


def test_query_shows_a_users_calls(aicc: Any, live: LiveServer, auditor_key: str) -> None:
    username = user_with_calls(live, 3)
    result = aicc("query", "--user", username, "--json", key=auditor_key)
    assert result.exit_code == 0, result.output
    entries = json.loads(result.output)
    assert [(e["username"], e["path"], e["status"]) for e in entries] == [
        (username, "/v1/models", 200)
    ] * 3
    result = aicc("query", "--user", username, "--limit", "2", "--json", key=auditor_key)
    assert [e["seq"] for e in json.loads(result.output)] == [e["seq"] for e in entries[:2]]

    # Piped (not a terminal): tab-separated, one header line and one line per entry.
    result = aicc("query", "--user", username, "--since", "10m", key=auditor_key)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split("\t")[:3] == ["SEQ", "TIME", "USER"]
    assert [line.split("\t")[2] for line in lines[1:]] == [username] * 3
    assert (
        aicc("query", "--user", username, "--until", "10m", key=auditor_key).output.count("\n") == 1
    )


def test_query_needs_the_auditor_role(aicc: Any, live: LiveServer) -> None:
    user_key = live.create_user_key(f"plain-{uuid.uuid4().hex[:6]}")
    result = aicc("query", key=user_key)
    assert result.exit_code == 1
    assert "audit:read" in result.output
    result = aicc("query")  # no credential at all
    assert result.exit_code == 1
    assert "aicc login" in result.output


def test_bad_times_are_usage_errors(aicc: Any, auditor_key: str) -> None:
    result = aicc("query", "--since", "last tuesday", key=auditor_key)
    assert result.exit_code == 2
    assert "ISO-8601" in result.output


def test_parse_when_reads_iso_times_and_ages() -> None:
    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    assert parse_when("24h", now=now) == datetime(2025, 5, 31, 12, 0, tzinfo=UTC)
    assert parse_when("180d", now=now) == now - timedelta(days=180)
    assert parse_when("2025-01-31") == datetime(2025, 1, 31, tzinfo=UTC)
    assert parse_when("2025-01-31T12:00:00+02:00") == datetime(2025, 1, 31, 10, tzinfo=UTC)


def test_export_writes_ecs_json_lines(
    aicc: Any, live: LiveServer, auditor_key: str, tmp_path: Path
) -> None:
    username = user_with_calls(live, 2)
    out = tmp_path / "audit.ndjson"
    result = aicc("export", "--user", username, "-o", str(out), key=auditor_key)
    assert result.exit_code == 0, result.output
    assert f"Exported 2 entries to {out}" in result.output
    documents = [json.loads(line) for line in out.read_text().splitlines()]
    assert [doc["user"]["name"] for doc in documents] == [username] * 2
    assert all(doc["ecs"]["version"] and doc["event"]["hash"] for doc in documents)
    assert not (tmp_path / "audit.ndjson.partial").exists()

    result = aicc("export", "--user", username, "--limit", "1", key=auditor_key)
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout.splitlines()[0])
    assert first["event"]["sequence"] == documents[0]["event"]["sequence"]


def test_export_refused_leaves_no_file(aicc: Any, live: LiveServer, tmp_path: Path) -> None:
    user_key = live.create_user_key(f"plain-{uuid.uuid4().hex[:6]}")
    out = tmp_path / "audit.ndjson"
    result = aicc("export", "-o", str(out), key=user_key)
    assert result.exit_code == 1
    assert "audit:read" in result.output
    assert not out.exists()
    assert not (tmp_path / "audit.ndjson.partial").exists()


def test_verify_passes_then_names_an_edited_or_deleted_entry(
    aicc: Any, live: LiveServer, tmp_path: Path
) -> None:
    user_with_calls(live, 4)
    clean = snapshot_state(live, tmp_path / "clean")
    result = aicc("verify", "--state-dir", str(clean))
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK: ")

    edited = snapshot_state(live, tmp_path / "edited")
    tamper(edited, "UPDATE audit_log SET status = 500 WHERE seq = 3")
    result = aicc("verify", "--state-dir", str(edited))
    assert result.exit_code == 1
    assert "FAILED at seq 3" in result.output

    deleted = snapshot_state(live, tmp_path / "deleted")
    tamper(deleted, "DELETE FROM audit_log WHERE seq = 4")
    result = aicc("verify", "--state-dir", str(deleted))
    assert result.exit_code == 1
    assert "FAILED at seq" in result.output


def test_verify_refuses_a_missing_state_dir(aicc: Any, tmp_path: Path) -> None:
    result = aicc("verify", "--state-dir", str(tmp_path / "nowhere"))
    assert result.exit_code == 1
    assert "no state database" in result.output
    assert not (tmp_path / "nowhere" / "secret.key").exists()


def test_purge_asks_then_purges_and_the_chain_still_verifies(
    aicc: Any, live: LiveServer, auditor_key: str, tmp_path: Path
) -> None:
    username = user_with_calls(live, 2)
    result = aicc("purge", "--before", "0s", key=ADMIN_KEY, stdin="n\n")
    assert result.exit_code == 1  # aborted: nothing deleted
    assert len(json.loads(aicc("query", "--user", username, "--json", key=auditor_key).output)) == 2

    result = aicc("purge", "--before", "0s", "--force", key=ADMIN_KEY)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Purged ")
    assert json.loads(aicc("query", "--user", username, "--json", key=auditor_key).output) == []
    result = aicc("purge", "--before", "0s", "--force", key=auditor_key)
    assert result.exit_code == 1
    assert "audit:purge" in result.output

    state = snapshot_state(live, tmp_path / "after-purge")
    result = aicc("verify", "--state-dir", str(state))
    assert result.exit_code == 0, result.output
