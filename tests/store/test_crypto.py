"""The encrypted model format, the key sources, rotation, and decryption into memory."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from aicc.config import Settings, load_settings
from aicc.errors import ConfigError, InvalidRequestError
from aicc.store import model_keys
from aicc.store.crypto import (
    HEADER_BYTES,
    MAGIC,
    TAG_BYTES,
    ModelDecryptionError,
    decrypt_file,
    decrypt_to_fd,
    encrypt_file,
    is_encrypted,
    key_id,
    plaintext_paths,
    rotate_file,
)
from aicc.store.model_keys import find_model_key, load_model_key

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
CHUNK = 64


def _fd_bytes(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def _encrypted(tmp_path: Path, data: bytes, key: bytes = KEY) -> Path:
    src = tmp_path / "model.gguf"
    src.write_bytes(data)
    dst = tmp_path / "model.gguf.aicc-enc"
    encrypt_file(src, dst, key, chunk_size=CHUNK)
    return dst


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 7])
def test_roundtrip(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    src = tmp_path / "model.gguf"
    src.write_bytes(data)
    dst = tmp_path / "model.gguf.aicc-enc"
    assert encrypt_file(src, dst, KEY, chunk_size=CHUNK) == hashlib.sha256(data).hexdigest()
    assert is_encrypted(dst)
    assert not is_encrypted(src)
    assert dst.read_bytes()[: len(MAGIC)] == MAGIC
    # (A few bytes of plaintext turn up in any random ciphertext by chance: check 16 and up.)
    assert data not in dst.read_bytes()[HEADER_BYTES:] or size < 16
    fd = decrypt_to_fd(dst, KEY)
    try:
        assert _fd_bytes(fd) == data
    finally:
        os.close(fd)
    out = tmp_path / "plain.gguf"
    assert decrypt_file(dst, out, KEY) == hashlib.sha256(data).hexdigest()
    assert out.read_bytes() == data


def test_two_encryptions_differ(tmp_path: Path) -> None:
    """Fresh salt and nonce per file: the same plaintext never gives the same bytes."""
    first = _encrypted(tmp_path, b"x" * 100).read_bytes()
    second = _encrypted(tmp_path, b"x" * 100).read_bytes()
    assert first != second


def test_wrong_key(tmp_path: Path) -> None:
    dst = _encrypted(tmp_path, os.urandom(200))
    with pytest.raises(ModelDecryptionError) as caught:
        decrypt_to_fd(dst, OTHER_KEY)
    assert caught.value.message == (
        f"the model key does not match this file (key id {key_id(OTHER_KEY)}, "
        f"file key id {key_id(KEY)})"
    )


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (0, "is not an aicc encrypted model file"),
        (9, "uses encrypted format version"),
        (14, "header of model.gguf.aicc-enc failed authentication"),  # chunk_size
        (20, "header of model.gguf.aicc-enc failed authentication"),  # plaintext size
        (24, "the model key does not match this file"),  # key id
        (40, "header of model.gguf.aicc-enc failed authentication"),  # salt
        (HEADER_BYTES - 1, "header of model.gguf.aicc-enc failed authentication"),  # mac
    ],
)
def test_flipped_header_byte(tmp_path: Path, offset: int, expected: str) -> None:
    dst = _encrypted(tmp_path, os.urandom(200))
    _flip(dst, offset)
    with pytest.raises(ModelDecryptionError, match=expected):
        decrypt_to_fd(dst, KEY)


@pytest.mark.parametrize(
    ("offset", "chunk"),
    [
        (HEADER_BYTES, 0),  # first ciphertext byte
        (HEADER_BYTES + CHUNK + TAG_BYTES - 1, 0),  # chunk 0's tag
        (HEADER_BYTES + 2 * (CHUNK + TAG_BYTES) + 5, 2),
        (-1, 3),  # the last chunk's tag
    ],
)
def test_flipped_chunk_byte(tmp_path: Path, offset: int, chunk: int) -> None:
    dst = _encrypted(tmp_path, os.urandom(3 * CHUNK + 10))
    _flip(dst, offset if offset >= 0 else dst.stat().st_size + offset)
    with pytest.raises(ModelDecryptionError) as caught:
        decrypt_to_fd(dst, KEY)
    assert caught.value.message == (
        f"chunk {chunk} failed authentication: the file is corrupted or was tampered with"
    )


def test_truncated_and_extended(tmp_path: Path) -> None:
    dst = _encrypted(tmp_path, os.urandom(3 * CHUNK))
    data = dst.read_bytes()
    dst.write_bytes(data[: -(CHUNK + TAG_BYTES)])  # the last chunk removed
    with pytest.raises(ModelDecryptionError, match="is truncated"):
        decrypt_to_fd(dst, KEY)
    dst.write_bytes(data + data[-(CHUNK + TAG_BYTES) :])  # a chunk appended
    with pytest.raises(ModelDecryptionError, match="is extended"):
        decrypt_to_fd(dst, KEY)


def test_swapped_chunks(tmp_path: Path) -> None:
    dst = _encrypted(tmp_path, os.urandom(3 * CHUNK))
    data = dst.read_bytes()
    sealed = CHUNK + TAG_BYTES
    first = data[HEADER_BYTES : HEADER_BYTES + sealed]
    second = data[HEADER_BYTES + sealed : HEADER_BYTES + 2 * sealed]
    swapped = data[:HEADER_BYTES] + second + first + data[HEADER_BYTES + 2 * sealed :]
    dst.write_bytes(swapped)
    with pytest.raises(ModelDecryptionError, match=r"^chunk 0 failed authentication"):
        decrypt_to_fd(dst, KEY)


def test_header_from_another_file_is_refused(tmp_path: Path) -> None:
    """Chunks authenticate the header: a valid header of another file does not fit them."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = _encrypted(tmp_path / "a", os.urandom(2 * CHUNK))
    two = _encrypted(tmp_path / "b", os.urandom(2 * CHUNK))
    one.write_bytes(two.read_bytes()[:HEADER_BYTES] + one.read_bytes()[HEADER_BYTES:])
    with pytest.raises(ModelDecryptionError, match=r"^chunk 0 failed authentication"):
        decrypt_to_fd(one, KEY)


def test_encrypting_twice_or_bad_chunk_size_is_refused(tmp_path: Path) -> None:
    dst = _encrypted(tmp_path, b"data")
    with pytest.raises(InvalidRequestError, match="already encrypted"):
        encrypt_file(dst, tmp_path / "again", KEY)
    with pytest.raises(InvalidRequestError, match="chunk_size"):
        encrypt_file(tmp_path / "model.gguf", tmp_path / "x", KEY, chunk_size=1)


def test_rotate(tmp_path: Path) -> None:
    data = os.urandom(4 * CHUNK + 3)
    dst = _encrypted(tmp_path, data)
    rotate_file(dst, KEY, OTHER_KEY)
    with pytest.raises(ModelDecryptionError, match="does not match"):
        decrypt_to_fd(dst, KEY)
    fd = decrypt_to_fd(dst, OTHER_KEY)
    try:
        assert _fd_bytes(fd) == data
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "model.gguf.aicc-enc"]


def test_rotate_with_the_wrong_old_key_changes_nothing(tmp_path: Path) -> None:
    dst = _encrypted(tmp_path, os.urandom(100))
    before = dst.read_bytes()
    with pytest.raises(ModelDecryptionError, match="does not match"):
        rotate_file(dst, OTHER_KEY, KEY)
    assert dst.read_bytes() == before
    _flip(dst, dst.stat().st_size - 1)  # a damaged file is not rotated either
    damaged = dst.read_bytes()
    with pytest.raises(ModelDecryptionError, match="chunk 1 failed"):
        rotate_file(dst, KEY, OTHER_KEY)
    assert dst.read_bytes() == damaged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "model.gguf.aicc-enc"]


def test_plaintext_paths_memfd_and_no_plaintext_on_disk(tmp_path: Path) -> None:
    data = os.urandom(10 * CHUNK + 1)
    dst = _encrypted(tmp_path, data)
    (tmp_path / "model.gguf").unlink()
    plain = tmp_path / "plain.gguf"
    plain.write_bytes(b"GGUF plain")
    with plaintext_paths([dst, plain], KEY) as paths:
        assert paths[1] == plain
        assert str(paths[0]).startswith("/proc/self/fd/")
        assert paths[0].read_bytes() == data
        target = os.readlink(paths[0])
        assert target.startswith("/memfd:aicc-model:"), target
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf.aicc-enc", "plain.gguf"]
        with pytest.raises(PermissionError):  # sealed: nothing may change what is mapped
            paths[0].write_bytes(b"x")
        fd = int(paths[0].name)
    with pytest.raises(OSError, match="Bad file descriptor"):  # closed on exit
        os.fstat(fd)
    with (
        pytest.raises(ModelDecryptionError, match="no model key is configured"),
        plaintext_paths([dst], None),
    ):
        pass


# -- key sources -------------------------------------------------------------------------------
def _settings(**fields: object) -> Settings:
    return load_settings(**fields)


def _key_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "model.key"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_key_file(tmp_path: Path) -> None:
    path = _key_file(tmp_path, KEY.hex() + "\n")
    settings = _settings(model_key_file=path, model_key_command="false")
    assert load_model_key(settings, {"AICC_MODEL_KEY": OTHER_KEY.hex()}) == KEY  # file first


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_key_file_with_bad_mode_is_refused(tmp_path: Path, mode: int) -> None:
    path = _key_file(tmp_path, KEY.hex(), mode)
    with pytest.raises(ConfigError, match="accessible by group or others; run `chmod 600"):
        load_model_key(_settings(model_key_file=path))


@pytest.mark.parametrize(
    ("text", "expected"), [("zz" * 32, "does not hold a hex key"), ("ab" * 16, "must hold 64")]
)
def test_malformed_keys(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        load_model_key(_settings(model_key_file=_key_file(tmp_path, text)))
    assert text not in caught.value.message
    with pytest.raises(ConfigError, match=f"AICC_MODEL_KEY {expected}"):
        load_model_key(_settings(), {"AICC_MODEL_KEY": text})


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_model_key(_settings(model_key_file=tmp_path / "absent.key"))


def test_env_key_and_none(tmp_path: Path) -> None:
    settings = _settings(model_key_env="MY_MODEL_KEY")
    assert load_model_key(settings, {"MY_MODEL_KEY": f"  {KEY.hex()}  "}) == KEY
    assert find_model_key(settings, {}) is None
    with pytest.raises(ConfigError, match="no model encryption key is configured"):
        load_model_key(settings, {"AICC_MODEL_KEY": KEY.hex()})


def test_key_command(tmp_path: Path) -> None:
    script = f"import sys; print({KEY.hex()!r}); print('log line', file=sys.stderr)"
    command = f"{sys.executable} -c {script!r}"
    settings = _settings(model_key_command=command)
    assert load_model_key(settings, {"AICC_MODEL_KEY": OTHER_KEY.hex()}) == KEY  # before env


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("import sys; print('kms: denied', file=sys.stderr); sys.exit(3)", "exit status 3: kms"),
        ("print('not a key')", "does not hold a hex key"),
    ],
)
def test_key_command_failures(script: str, expected: str) -> None:
    command = f"{sys.executable} -c {script!r}"
    with pytest.raises(ConfigError, match=expected):
        load_model_key(_settings(model_key_command=command))


def test_key_command_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_keys, "KEY_COMMAND_TIMEOUT_S", 0.3)
    command = f"{sys.executable} -c 'import time; time.sleep(5)'"
    with pytest.raises(ConfigError, match=r"did not finish within 0\.3 s"):
        load_model_key(_settings(model_key_command=command))


def test_key_command_that_cannot_run() -> None:
    with pytest.raises(ConfigError, match="cannot run"):
        load_model_key(_settings(model_key_command="/nonexistent/kms-client --get"))
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_model_key(_settings(model_key_command="kms 'unterminated"))
