"""An encrypted model, decrypted into memory, serves exactly what the plaintext model does."""

from __future__ import annotations

from pathlib import Path

import pytest

from aicc.store.crypto import ModelDecryptionError, encrypt_file, plaintext_paths
from aicc.store.local import BUNDLED_MODEL_NAME
from tests.store.greedy import greedy_tokens

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def encrypted_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("encrypted") / f"{BUNDLED_MODEL_NAME}.gguf.aicc-enc"
    encrypt_file(model_dir / f"{BUNDLED_MODEL_NAME}.gguf", target, KEY)
    return target


def test_encrypted_model_generates_the_same_tokens(model_dir: Path, encrypted_model: Path) -> None:
    expected = greedy_tokens(model_dir / f"{BUNDLED_MODEL_NAME}.gguf")
    assert len(expected) == 16
    with plaintext_paths([encrypted_model], KEY) as (path,):
        assert str(path).startswith("/proc/self/fd/")
        assert greedy_tokens(path) == expected
    assert sorted(p.name for p in encrypted_model.parent.iterdir()) == [encrypted_model.name]


def test_tampered_model_is_refused_before_llama_cpp_sees_it(encrypted_model: Path) -> None:
    tampered = encrypted_model.with_name("tampered.gguf.aicc-enc")
    data = bytearray(encrypted_model.read_bytes())
    data[len(data) // 2] ^= 0x40
    tampered.write_bytes(bytes(data))
    try:
        with (
            pytest.raises(ModelDecryptionError, match=r"^chunk \d+ failed authentication"),
            plaintext_paths([tampered], KEY),
        ):
            pass
        with (
            pytest.raises(ModelDecryptionError, match="does not match this file"),
            plaintext_paths([encrypted_model], bytes(32)),
        ):
            pass
    finally:
        tampered.unlink()
