"""Settings that pass validation one by one but contradict each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aicc.config import load_settings
from aicc.doctor.checks import CheckResult, Status
from aicc.doctor.consistency import consistency_checks


def check(tmp_path: Path, **settings: Any) -> dict[str, CheckResult]:
    results = consistency_checks(load_settings(state_dir=tmp_path, **settings), "loaded")
    return {result.name: result for result in results}


def test_default_settings_have_no_contradictions(tmp_path: Path) -> None:
    results = check(tmp_path)
    assert list(results) == ["settings"]
    assert results["settings"].status is Status.PASS


def test_metrics_port_on_the_main_port_fails(tmp_path: Path) -> None:
    result = check(tmp_path, port=9000, metrics_port=9000, metrics_host="0.0.0.0")
    assert result["settings: metrics_port"].status is Status.FAIL
    assert "settings: metrics_port" not in check(tmp_path, port=9000, metrics_port=9001)


def test_metrics_options_without_metrics_warn(tmp_path: Path) -> None:
    result = check(tmp_path, metrics_enabled=False, metrics_public=True)["settings: metrics"]
    assert result.status is Status.WARN
    assert result.value == "metrics_public set, but metrics_enabled is false"


def test_tiny_deterministic_slots_warn(tmp_path: Path) -> None:
    result = check(tmp_path, batch_invariant=True, ctx_size=4096, max_batch_size=16)
    assert "256 tokens of context" in result["settings: batch_invariant"].value


def test_model_encryption_without_a_key_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AICC_MODEL_KEY", raising=False)
    result = check(tmp_path, model_encrypt=True)["settings: model_encrypt"]
    assert result.status is Status.FAIL
    assert "model_key_file" in result.fix
    monkeypatch.setenv("AICC_MODEL_KEY", "00" * 32)
    assert "settings: model_encrypt" not in check(tmp_path, model_encrypt=True)


def test_a_model_key_file_open_to_others_fails(tmp_path: Path) -> None:
    key_file = tmp_path / "model.key"
    key_file.write_text("11" * 32)
    key_file.chmod(0o644)
    result = check(tmp_path, model_encrypt=True, model_key_file=key_file)
    assert "chmod 600" in result["settings: model_key_file"].value


def test_captured_content_without_a_key_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AICC_AUDIT_CONTENT_KEY", raising=False)
    result = check(tmp_path, audit_capture_content=True)["settings: audit_capture_content"]
    assert result.status is Status.FAIL
    off = check(tmp_path, audit_capture_content=True, audit_enabled=False)
    assert off["settings: audit_capture_content"].status is Status.WARN


def test_a_shared_database_without_a_common_secret_warns(tmp_path: Path) -> None:
    result = check(tmp_path, database_url="postgresql+psycopg://aicc@db/aicc")
    assert result["settings: secret_key"].status is Status.WARN
    shared = check(tmp_path, database_url="postgresql+psycopg://aicc@db/aicc", secret_key="s" * 32)
    assert "settings: secret_key" not in shared
