"""The registry over a real SQLite state database and real files in a model directory."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from aicc.db import Database
from aicc.errors import ConflictError, InvalidRequestError, ModelNotFoundError
from aicc.store.local import resolve_model
from aicc.store.registry import ModelRegistry
from tests.models.tiny_deepseek import CONTEXT_LENGTH, write_tiny_deepseek


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_deepseek(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ModelRegistry]:
    database = Database(f"sqlite:///{tmp_path / 'aicc.db'}")
    database.migrate()
    yield ModelRegistry(database, tmp_path / "models")
    database.close()


def place(registry: ModelRegistry, tiny: Path, name: str, tag: str) -> Path:
    directory = registry.model_dir / name / tag
    directory.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(tiny, directory / tiny.name))


def test_register_reads_metadata_and_hashes(registry: ModelRegistry, tiny: Path) -> None:
    path = place(registry, tiny, "tiny", "latest")
    record = registry.register("tiny", [path], source="import:/somewhere/tiny.gguf")
    assert record.ref == "tiny:latest"
    assert record.files == ("tiny.gguf",)
    assert record.sha256 == (hashlib.sha256(tiny.read_bytes()).hexdigest(),)
    assert record.size_bytes == tiny.stat().st_size
    assert record.architecture == "deepseek2"
    assert record.context_length == CONTEXT_LENGTH
    assert record.quantization == "F32"
    assert record.parameter_count is not None
    assert record.parameter_count > 100_000
    assert not record.encrypted
    assert record.paths(registry.model_dir) == [path.resolve()]
    assert registry.get("tiny:latest") == record
    assert registry.find("tiny:other") is None
    assert [r.ref for r in registry.list()] == ["tiny:latest"]


def test_conflicts_and_files_outside_the_models_dir(
    registry: ModelRegistry, tiny: Path, tmp_path: Path
) -> None:
    path = place(registry, tiny, "tiny", "latest")
    registry.register("tiny", [path], source="import:x")
    with pytest.raises(ConflictError):
        registry.register("tiny:latest", [path], source="import:x")
    with pytest.raises(InvalidRequestError, match="is not a file in"):
        registry.register("tiny:other", [path], source="import:x")  # not in tiny/other/
    with pytest.raises(InvalidRequestError, match="is not a file in"):
        registry.register("elsewhere", [tiny], source="import:x")
    with pytest.raises(InvalidRequestError):
        registry.register("../escape", [path], source="import:x")
    with pytest.raises(ModelNotFoundError):
        registry.get("nothing")


def test_replace_files_and_change_marker(registry: ModelRegistry, tiny: Path) -> None:
    assert registry.change_marker() == (0, None)
    path = place(registry, tiny, "tiny", "v1")
    record = registry.register("tiny:v1", [path], source="import:x")
    count, first = registry.change_marker()
    assert count == 1
    assert first is not None
    updated = registry.replace_files("tiny:v1", ["tiny.gguf.aicc-enc"], encrypted=True)
    assert updated.files == ("tiny.gguf.aicc-enc",)
    assert updated.encrypted
    assert updated.sha256 == record.sha256  # of the plaintext: unchanged
    count, second = registry.change_marker()
    assert count == 1
    assert second is not None
    assert second >= first
    assert second != first or updated.updated_at > record.updated_at
    with pytest.raises(InvalidRequestError):
        registry.replace_files("tiny:v1", ["a.gguf", "b.gguf"], encrypted=False)
    with pytest.raises(InvalidRequestError):
        registry.replace_files("tiny:v1", ["../../x.gguf"], encrypted=False)
    with pytest.raises(ModelNotFoundError):
        registry.replace_files("ghost", ["x.gguf"], encrypted=False)


def test_remove_deletes_row_and_directory(registry: ModelRegistry, tiny: Path) -> None:
    keep = place(registry, tiny, "tiny", "keep")
    gone = place(registry, tiny, "tiny", "gone")
    registry.register("tiny:keep", [keep], source="import:x")
    registry.register("tiny:gone", [gone], source="import:x")
    removed = registry.remove("tiny:gone")
    assert removed.ref == "tiny:gone"
    assert not gone.parent.exists()
    assert keep.is_file()
    assert registry.change_marker()[0] == 1
    registry.remove("tiny:keep")
    assert not (registry.model_dir / "tiny").exists()
    with pytest.raises(ModelNotFoundError):
        registry.remove("tiny:keep")


def test_resolve_model_finds_registered_refs(registry: ModelRegistry, tiny: Path) -> None:
    path = place(registry, tiny, "deep", "7b")
    registry.register("deep:7b", [path], source="import:x")
    by_registry = resolve_model("deep:7b", registry.model_dir, registry)
    assert by_registry.path == path.resolve()
    assert by_registry.name == "deep:7b"
    by_directory = resolve_model("deep:7b", registry.model_dir)
    assert by_directory.path.resolve() == path.resolve()
    with pytest.raises(ModelNotFoundError):
        resolve_model("deep", registry.model_dir, registry)  # deep:latest is not there
    with pytest.raises(ModelNotFoundError):
        resolve_model("deep:../..", registry.model_dir)
