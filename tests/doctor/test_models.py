"""Model checks on real GGUF files: present, intact, loadable; the memory they need."""

from __future__ import annotations

from pathlib import Path

import pytest

from aicc.config import load_settings
from aicc.doctor.checks import Status
from aicc.doctor.models import MemoryBudget, kv_bytes_per_token, model_checks
from aicc.store.local import BUNDLED_MODEL_NAME
from tests.models.tiny_deepseek import CONTEXT_LENGTH, write_tiny_deepseek

GEMMA3_270M = {
    "general.architecture": "gemma3",
    "gemma3.block_count": 18,
    "gemma3.embedding_length": 640,
    "gemma3.attention.head_count": 4,
    "gemma3.attention.head_count_kv": 1,
    "gemma3.attention.key_length": 256,
    "gemma3.attention.value_length": 256,
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("doctor-models")
    write_tiny_deepseek(path / "tiny.gguf")
    return path


def test_a_gguf_in_the_model_dir_is_checked_and_loaded(tiny_dir: Path) -> None:
    settings = load_settings(model="tiny", model_dir=tiny_dir, state_dir=tiny_dir)
    results, facts = model_checks(settings)
    assert [(r.name, r.status) for r in results] == [
        ("model", Status.PASS),
        ("model integrity", Status.PASS),
        ("model load", Status.PASS),
    ]
    assert "no checksum on record" in results[1].value
    assert "deepseek2" in results[2].value
    assert facts is not None
    assert facts.context_length == CONTEXT_LENGTH
    assert facts.kv_bytes_per_token


def test_a_truncated_gguf_fails_its_integrity_check(tiny_dir: Path, tmp_path: Path) -> None:
    data = (tiny_dir / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    settings = load_settings(model="cut", model_dir=tmp_path, state_dir=tmp_path)
    results, _ = model_checks(settings)
    integrity = {r.name: r for r in results}["model integrity"]
    assert integrity.status is Status.FAIL
    assert "truncated or corrupt" in integrity.value
    assert "again" in integrity.fix
    assert {r.name: r for r in results}["model load"].status is Status.SKIP


def test_an_unassembled_bundle_is_not_written_by_the_doctor(tmp_path: Path) -> None:
    settings = load_settings(model=BUNDLED_MODEL_NAME, model_dir=tmp_path / "m", state_dir=tmp_path)
    results, facts = model_checks(settings)
    assert [r.status for r in results] == [Status.PASS, Status.SKIP, Status.SKIP]
    assert facts is not None
    assert not facts.is_present
    assert facts.size_bytes > 200 * 1024**2
    assert not (tmp_path / "m").exists()


def test_kv_bytes_per_token_from_gguf_metadata() -> None:
    assert kv_bytes_per_token(GEMMA3_270M) == 18 * 1 * (256 + 256) * 2
    without_kv_heads = {k: v for k, v in GEMMA3_270M.items() if "head_count_kv" not in k}
    assert kv_bytes_per_token(without_kv_heads) == 18 * 4 * (256 + 256) * 2
    assert kv_bytes_per_token({"general.architecture": "x"}) is None


def test_memory_budget_adds_its_parts() -> None:
    budget = MemoryBudget(weights=100, kv_cache=20, runtime=3)
    assert budget.total == 123
    assert budget.describe().startswith("weights 100 B + KV cache 20 B")
