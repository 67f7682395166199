"""encrypt / decrypt / rotate-key / quantize on registered models (real registry, tiny GGUF)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from aicc.db import Database
from aicc.engine.llamacpp.model import ContextConfig, LlamaModel
from aicc.errors import ConflictError, InvalidRequestError
from aicc.store.crypto import ModelDecryptionError, is_encrypted, key_id, plaintext_paths
from aicc.store.ops import decrypt_model, encrypt_model, quantize_model, rotate_model_key
from aicc.store.registry import ModelRecord, ModelRegistry
from tests.models.tiny_deepseek import write_tiny_deepseek

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
THIRD_KEY = bytes(range(2, 34))


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    database = Database(f"sqlite:///{tmp_path / 'state' / 'aicc.db'}")
    database.migrate()
    return ModelRegistry(database, tmp_path / "models")


def _register_tiny(registry: ModelRegistry, ref: str = "tiny") -> tuple[ModelRecord, bytes]:
    directory = registry.model_dir / ref.partition(":")[0] / "latest"
    directory.mkdir(parents=True)
    path = write_tiny_deepseek(directory / "tiny-f32.gguf")
    record = registry.register(ref, [path], source="import:test")
    return record, path.read_bytes()


def _listing(record: ModelRecord, registry: ModelRegistry) -> list[str]:
    return sorted(p.name for p in record.directory(registry.model_dir).iterdir())


def test_encrypt_then_decrypt(registry: ModelRegistry) -> None:
    record, data = _register_tiny(registry)
    encrypted = encrypt_model(registry, registry.model_dir, "tiny", KEY)
    assert encrypted.encrypted
    assert encrypted.files == ("tiny-f32.gguf.aicc-enc",)
    assert encrypted.sha256 == record.sha256 == (hashlib.sha256(data).hexdigest(),)
    assert _listing(encrypted, registry) == ["tiny-f32.gguf.aicc-enc"]  # plaintext gone
    (path,) = encrypted.paths(registry.model_dir)
    assert is_encrypted(path)
    with plaintext_paths([path], KEY) as (plain,):
        assert plain.read_bytes() == data
    with pytest.raises(InvalidRequestError, match="already encrypted"):
        encrypt_model(registry, registry.model_dir, "tiny", KEY)
    with pytest.raises(ModelDecryptionError, match="does not match this file"):
        decrypt_model(registry, registry.model_dir, "tiny", OTHER_KEY)
    assert _listing(encrypted, registry) == ["tiny-f32.gguf.aicc-enc"]

    decrypted = decrypt_model(registry, registry.model_dir, "tiny:latest", KEY)
    assert not decrypted.encrypted
    assert decrypted.files == ("tiny-f32.gguf",)
    assert decrypted.paths(registry.model_dir)[0].read_bytes() == data
    assert _listing(decrypted, registry) == ["tiny-f32.gguf"]
    assert registry.get("tiny").encrypted is False
    with pytest.raises(InvalidRequestError, match="is not encrypted"):
        decrypt_model(registry, registry.model_dir, "tiny", KEY)


def test_encrypt_refuses_a_file_changed_since_registration(registry: ModelRegistry) -> None:
    record, data = _register_tiny(registry)
    (path,) = record.paths(registry.model_dir)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(InvalidRequestError, match="no longer matches its recorded sha256"):
        encrypt_model(registry, registry.model_dir, "tiny", KEY)
    assert _listing(record, registry) == ["tiny-f32.gguf"]
    assert not registry.get("tiny").encrypted


def test_rotate(registry: ModelRegistry) -> None:
    _, data = _register_tiny(registry)
    encrypt_model(registry, registry.model_dir, "tiny", KEY)
    with pytest.raises(ModelDecryptionError, match="does not match this file"):
        rotate_model_key(registry, registry.model_dir, "tiny", THIRD_KEY, OTHER_KEY)
    rotated = rotate_model_key(registry, registry.model_dir, "tiny", KEY, OTHER_KEY)
    (path,) = rotated.paths(registry.model_dir)
    with plaintext_paths([path], OTHER_KEY) as (plain,):
        assert plain.read_bytes() == data
    with pytest.raises(ModelDecryptionError, match=key_id(KEY)):
        plaintext_paths([path], KEY).__enter__()
    # Running it again (as after a crash part-way through) skips what is already rotated.
    before = path.read_bytes()
    rotate_model_key(registry, registry.model_dir, "tiny", KEY, OTHER_KEY)
    assert path.read_bytes() == before
    assert _listing(rotated, registry) == ["tiny-f32.gguf.aicc-enc"]


def test_rotate_needs_an_encrypted_model(registry: ModelRegistry) -> None:
    _register_tiny(registry)
    with pytest.raises(InvalidRequestError, match="not encrypted"):
        rotate_model_key(registry, registry.model_dir, "tiny", KEY, OTHER_KEY)


def test_quantize_encrypted_source_stays_encrypted(registry: ModelRegistry) -> None:
    _register_tiny(registry)
    encrypt_model(registry, registry.model_dir, "tiny", KEY)
    result = quantize_model(registry, registry.model_dir, "tiny", "q8_0", None, KEY, threads=2)
    assert result.ref == "tiny:q8_0"
    assert (result.parent, result.source) == ("tiny:latest", "quantize:tiny:latest")
    assert result.encrypted
    assert (result.quantization, result.architecture) == ("Q8_0", "deepseek2")
    assert result.files == ("tiny-q8_0.gguf.aicc-enc",)
    assert _listing(result, registry) == ["tiny-q8_0.gguf.aicc-enc"]  # no plaintext on disk
    (path,) = result.paths(registry.model_dir)
    with plaintext_paths([path], KEY) as (plain,):
        assert hashlib.sha256(plain.read_bytes()).hexdigest() == result.sha256[0]
        assert result.size_bytes == plain.stat().st_size
        config = ContextConfig(256, 32, 1, 1, use_gpu=False, batch_invariant=False)
        model = LlamaModel(plain, "tiny", config)
        try:
            assert model.info.architecture == "deepseek2"
        finally:
            model.close()


def test_quantize_plaintext_and_refusals(registry: ModelRegistry) -> None:
    _register_tiny(registry)
    result = quantize_model(
        registry, registry.model_dir, "tiny", "Q4_0", "small:q4", None, threads=2
    )
    assert (result.ref, result.quantization, result.encrypted) == ("small:q4", "Q4_0", False)
    assert result.files == ("tiny-q4_0.gguf",)
    with pytest.raises(ConflictError, match="already exists"):
        quantize_model(registry, registry.model_dir, "tiny", "Q8_0", "small:q4", None)
    with pytest.raises(InvalidRequestError, match="unknown quantization type 'Q9_9'"):
        quantize_model(registry, registry.model_dir, "tiny", "Q9_9", None, None)
    with pytest.raises(InvalidRequestError, match="a model key is needed"):
        quantize_model(registry, registry.model_dir, "tiny", "Q8_0", None, None, encrypt=True)
    with pytest.raises(InvalidRequestError, match="invalid model name"):
        quantize_model(registry, registry.model_dir, "tiny", "Q8_0", "../evil", None)
    assert [r.ref for r in registry.list()] == ["small:q4", "tiny:latest"]
    assert sorted(p.name for p in registry.model_dir.iterdir()) == ["small", "tiny"]
