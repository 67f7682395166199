"""`verify` passes on a clean log and names the first bad seq for each kind of tampering,
done the way an attacker with database access would: plain SQL on the real table."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import insert, text

from aicc.audit import verify
from aicc.audit.entries import AuditEntry
from aicc.audit.query import query
from aicc.config import Settings
from aicc.db import Database
from aicc.db.models import AuditEntryRow
from tests.audit.conftest import SECRET, write_calls

NUM_ENTRIES = 20
"""Checkpoints (every 5) at 5, 10, 15, 20 and a closing one at 20."""


@pytest.fixture
def log_db(
    audit_db: Database, make_settings: Callable[..., Settings], checkpoints_path: Path
) -> Database:
    write_calls(audit_db, make_settings(audit_checkpoint_every=5), NUM_ENTRIES)
    return audit_db


def _sql(db: Database, *statements: str) -> None:
    with db.engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def _first_bad(db: Database, checkpoints_path: Path, secret: bytes = SECRET) -> int | None:
    report = verify(db, checkpoints_path, secret)
    assert not report.ok
    assert report.problem
    return report.first_bad_seq


def _shift(db: Database, from_seq: int, by: int) -> None:
    # Two steps: a unique key may not hold in the middle of a single UPDATE.
    _sql(
        db,
        f"UPDATE audit_log SET seq = seq + 1000 WHERE seq >= {from_seq}",
        f"UPDATE audit_log SET seq = seq - 1000 + {by} WHERE seq >= 1000",
    )


def test_a_clean_log_verifies(log_db: Database, checkpoints_path: Path) -> None:
    report = verify(log_db, checkpoints_path, SECRET)
    assert (report.ok, report.num_checked, report.first_bad_seq, report.problem) == (
        True,
        NUM_ENTRIES,
        None,
        None,
    )


def test_an_empty_log_verifies(audit_db: Database, checkpoints_path: Path) -> None:
    assert verify(audit_db, checkpoints_path, SECRET).ok


@pytest.mark.parametrize(
    "assignment",
    ["status = 201", "username = 'mallory'", "model = 'other'", "latency_ms = 1.5",
     "detail = '{\"x\": 1}'", "time = time"],
)  # fmt: skip
def test_an_edited_field_is_named(
    log_db: Database, checkpoints_path: Path, assignment: str
) -> None:
    _sql(log_db, f"UPDATE audit_log SET {assignment} WHERE seq = 7")
    if assignment == "time = time":  # a no-op edit must not be reported
        assert verify(log_db, checkpoints_path, SECRET).ok
        return
    assert _first_bad(log_db, checkpoints_path) == 7


def test_an_edit_with_the_chain_rehashed_is_caught_by_the_next_checkpoint(
    log_db: Database, checkpoints_path: Path
) -> None:
    entries = query(log_db, limit=100)
    forged = [replace(entries[6], status=201)]  # seq 7
    for entry in entries[7:12]:  # rehash 8..12 so that every link holds
        forged.append(entry.chained(entry.seq, forged[-1].hash))
    forged[0] = forged[0].chained(7, entries[5].hash)
    for index in range(1, len(forged)):
        forged[index] = forged[index].chained(forged[index].seq, forged[index - 1].hash)
    _sql(log_db, "DELETE FROM audit_log WHERE seq >= 7 AND seq <= 12")
    with log_db.engine.begin() as conn:
        conn.execute(insert(AuditEntryRow), [e.to_row() for e in forged])
    # The links hold but the checkpoint at 10 does not: 6..10 are no longer vouched for.
    report = verify(log_db, checkpoints_path, SECRET)
    assert (report.ok, report.first_bad_seq) == (False, 6)
    assert report.problem is not None
    assert "checkpoint at seq 10" in report.problem


@pytest.mark.parametrize("seq", [1, 7, 19])
def test_a_deleted_entry_is_named(log_db: Database, checkpoints_path: Path, seq: int) -> None:
    _sql(log_db, f"DELETE FROM audit_log WHERE seq = {seq}")
    assert _first_bad(log_db, checkpoints_path) == seq


def test_a_deleted_entry_with_the_rest_renumbered_is_named(
    log_db: Database, checkpoints_path: Path
) -> None:
    _sql(log_db, "DELETE FROM audit_log WHERE seq = 7")
    _shift(log_db, 8, -1)
    assert _first_bad(log_db, checkpoints_path) == 7


def test_an_inserted_entry_is_named(log_db: Database, checkpoints_path: Path) -> None:
    entries = query(log_db, limit=100)
    # A well-formed entry linked to seq 6, its hash right: only its successor betrays it.
    intruder = replace(entries[6], request_id="forged").chained(7, entries[5].hash)
    _shift(log_db, 7, 1)
    with log_db.engine.begin() as conn:
        conn.execute(insert(AuditEntryRow), [intruder.to_row()])
    assert _first_bad(log_db, checkpoints_path) == 7


def test_an_entry_appended_with_a_wrong_hash_is_named(
    log_db: Database, checkpoints_path: Path
) -> None:
    last = query(log_db, limit=100)[-1]
    extra = AuditEntry.from_row({**last.to_row(), "seq": 21, "prev_hash": last.hash})
    with log_db.engine.begin() as conn:
        conn.execute(insert(AuditEntryRow), [{**extra.to_row(), "hash": "0" * 64}])
    assert _first_bad(log_db, checkpoints_path) == 21


@pytest.mark.parametrize(("from_seq", "first_bad"), [(18, 18), (9, 9), (1, 1)])
def test_a_truncated_tail_is_named(
    log_db: Database, checkpoints_path: Path, from_seq: int, first_bad: int
) -> None:
    _sql(log_db, f"DELETE FROM audit_log WHERE seq >= {from_seq}")
    assert _first_bad(log_db, checkpoints_path) == first_bad


def test_a_truncated_log_written_again_is_named(
    log_db: Database, make_settings: Callable[..., Settings], checkpoints_path: Path
) -> None:
    _sql(log_db, "DELETE FROM audit_log WHERE seq >= 13")
    write_calls(log_db, make_settings(audit_checkpoint_every=5), 10)  # new 13..22
    # 15 and 20 were vouched for with other hashes; 11 onwards is unvouched.
    assert _first_bad(log_db, checkpoints_path) == 11


def test_an_edited_checkpoint_is_named(log_db: Database, checkpoints_path: Path) -> None:
    lines = checkpoints_path.read_text().splitlines()
    data = json.loads(lines[1])  # seq 10
    data["hash"] = "f" * 64
    lines[1] = json.dumps(data)
    checkpoints_path.write_text("\n".join(lines) + "\n")
    report = verify(log_db, checkpoints_path, SECRET)
    assert (report.ok, report.first_bad_seq) == (False, 10)
    assert report.problem is not None
    assert "not signed" in report.problem


def test_a_forged_checkpoint_is_named(log_db: Database, checkpoints_path: Path) -> None:
    entry = query(log_db, after_seq=11, limit=1)[0]
    forged = {"seq": 12, "hash": entry.hash, "count": 12, "time": "2025-01-01T00:00:00.000000Z",
              "reason": "periodic", "hmac": "0" * 64}  # fmt: skip
    with checkpoints_path.open("a") as file:
        file.write(json.dumps(forged) + "\n")
    assert _first_bad(log_db, checkpoints_path) == 12


def test_checkpoints_signed_under_another_secret_fail(
    log_db: Database, checkpoints_path: Path
) -> None:
    assert _first_bad(log_db, checkpoints_path, b"another secret, 32 bytes long!!!") == 5


def test_the_first_problem_wins(log_db: Database, checkpoints_path: Path) -> None:
    _sql(log_db, "UPDATE audit_log SET status = 500 WHERE seq = 14")
    _sql(log_db, "DELETE FROM audit_log WHERE seq = 3")
    assert _first_bad(log_db, checkpoints_path) == 3


def test_verify_reads_what_the_database_returns(log_db: Database) -> None:
    # The table is what the migration made: a sanity check that the tests tamper the real one.
    with log_db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM audit_log")).scalar_one() == NUM_ENTRIES
