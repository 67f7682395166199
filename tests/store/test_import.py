"""`import_model`: files already on disk copied in, checked, and registered."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from aicc.db import Database
from aicc.errors import ConflictError, InvalidRequestError
from aicc.store.crypto import is_encrypted
from aicc.store.gguf_check import InvalidModelFileError
from aicc.store.importer import import_model
from aicc.store.registry import ModelRegistry
from tests.models.tiny_deepseek import write_tiny_deepseek

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_deepseek(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ModelRegistry]:
    database = Database(f"sqlite:///{tmp_path / 'aicc.db'}")
    database.migrate()
    yield ModelRegistry(database, tmp_path / "models")
    database.close()


def test_import_copies_and_registers(registry: ModelRegistry, tiny: Path) -> None:
    record = import_model(registry, tiny, "tiny:v1")
    assert record.source == f"import:{tiny.resolve()}"
    assert record.sha256 == (hashlib.sha256(tiny.read_bytes()).hexdigest(),)
    assert record.architecture == "deepseek2"
    [path] = record.paths(registry.model_dir)
    assert path.read_bytes() == tiny.read_bytes()
    assert [p.name for p in path.parent.iterdir()] == ["tiny.gguf"]  # no temp file left
    assert tiny.is_file()
    with pytest.raises(ConflictError):
        import_model(registry, tiny, "tiny:v1")


def test_move_and_multi_part(registry: ModelRegistry, tmp_path: Path) -> None:
    first = write_tiny_deepseek(tmp_path / "in" / "m-00001-of-00002.gguf", seed=1)
    second = write_tiny_deepseek(tmp_path / "in" / "m-00002-of-00002.gguf", seed=2)
    record = import_model(registry, first, "multi", move=True)
    assert record.files == ("m-00001-of-00002.gguf", "m-00002-of-00002.gguf")
    assert not first.exists()
    assert not second.exists()
    lone = write_tiny_deepseek(tmp_path / "in" / "x-00001-of-00003.gguf")
    with pytest.raises(InvalidRequestError, match="missing"):
        import_model(registry, lone, "lone")


def test_encrypted_import(registry: ModelRegistry, tiny: Path) -> None:
    record = import_model(registry, tiny, "secret", encrypt_key=KEY)
    assert record.encrypted
    assert record.architecture == "deepseek2"
    assert record.sha256 == (hashlib.sha256(tiny.read_bytes()).hexdigest(),)
    [path] = record.paths(registry.model_dir)
    assert path.name == "tiny.gguf.aicc-enc"
    assert is_encrypted(path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_pickle_files_are_refused(registry: ModelRegistry, tmp_path: Path, suffix: str) -> None:
    source = tmp_path / f"model{suffix}"
    source.write_bytes(b"\x80\x04\x95 pickle")
    with pytest.raises(InvalidModelFileError, match="pickle"):
        import_model(registry, source, "pickled")
    assert not (registry.model_dir / "pickled").exists()


def test_malformed_and_unsafe_imports_leave_nothing(
    registry: ModelRegistry, tiny: Path, tmp_path: Path
) -> None:
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(tiny.read_bytes()[:-100])
    with pytest.raises(InvalidModelFileError, match="past the end"):
        import_model(registry, truncated, "cut")
    for ref in ("../x", "a/b", "..", "x:../y"):
        with pytest.raises(InvalidRequestError):
            import_model(registry, tiny, ref)
    with pytest.raises(InvalidRequestError, match="not a file"):
        import_model(registry, tmp_path / "missing.gguf", "missing")
    assert registry.list() == []
    assert not registry.model_dir.exists() or not any(registry.model_dir.iterdir())
    shutil.rmtree(registry.model_dir, ignore_errors=True)
