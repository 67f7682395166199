"""Model files encrypted at rest: a chunked AES-256-GCM format, decrypted only into memory.

Layout of an encrypted file::

    header (92 bytes)
      magic "AICCENC1" | version u16 | reserved u16 | chunk_size u32 | plaintext_size u64
      | key_id 8 | salt 16 | base_nonce 12 | HMAC-SHA256 of the above (32)
    chunk 0 .. n-1: AES-256-GCM ciphertext of `chunk_size` plaintext bytes (the last one
      shorter; an empty file is one empty chunk) followed by its 16-byte tag

Each file gets its own AES and HMAC keys, derived from the model key and the file's random
salt (HKDF-SHA256), so nonces never repeat across files. Chunk i uses `base_nonce XOR i` and
authenticates `SHA-256(header) | i | is_last`: a changed header, a chunk moved, swapped,
dropped or appended, or a truncated file all fail authentication.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import struct
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aicc.errors import InvalidRequestError, ModelLoadError

MAGIC = b"AICCENC1"
ENCRYPTED_SUFFIX = ".aicc-enc"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 4 << 20
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 256 << 20
KEY_BYTES = 32
TAG_BYTES = 16

_FIELDS = struct.Struct(">8sHHIQ8s16s12s")
_MAC_BYTES = 32
HEADER_BYTES = _FIELDS.size + _MAC_BYTES
_KDF_INFO = b"aicc model file v1"
_KEY_ID_LABEL = b"aicc model key id"


class ModelDecryptionError(ModelLoadError):
    """An encrypted model file cannot be decrypted: wrong key, corrupted or tampered."""

    code = "model_decryption_failed"


@dataclass(frozen=True, slots=True)
class Header:
    chunk_size: int
    plaintext_size: int
    key_id: bytes
    salt: bytes
    base_nonce: bytes

    @property
    def num_chunks(self) -> int:
        """At least one: an empty file is one empty (authenticated) last chunk."""
        return max(1, -(-self.plaintext_size // self.chunk_size))

    @property
    def file_size(self) -> int:
        return HEADER_BYTES + self.plaintext_size + self.num_chunks * TAG_BYTES

    def fields(self) -> bytes:
        return _FIELDS.pack(
            MAGIC,
            FORMAT_VERSION,
            0,
            self.chunk_size,
            self.plaintext_size,
            self.key_id,
            self.salt,
            self.base_nonce,
        )


def key_id(key: bytes) -> str:
    """A short non-secret fingerprint of the model key (16 hex characters)."""
    return _key_id_bytes(key).hex()


def is_encrypted(path: Path) -> bool:
    """Whether `path` starts with the encrypted-model magic (the suffix is not trusted)."""
    try:
        with path.open("rb") as file:
            return file.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def file_key_id(path: Path) -> str | None:
    """The key id an encrypted file's header names (not authenticated); None if not one."""
    try:
        with path.open("rb") as file:
            raw = file.read(_FIELDS.size)
    except OSError:
        return None
    if len(raw) < _FIELDS.size or raw[: len(MAGIC)] != MAGIC:
        return None
    fields: tuple[bytes, int, int, int, int, bytes, bytes, bytes] = _FIELDS.unpack(raw)
    return fields[5].hex()


def encrypt_file(src: Path, dst: Path, key: bytes, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> str:
    """Encrypt `src` into `dst` (atomically: temp file, then rename); return the plaintext's
    sha256 hex.

    Raises InvalidRequestError for an already encrypted source or a bad chunk size.
    """
    _check_key(key)
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidRequestError(
            f"chunk_size must lie in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}], not {chunk_size}"
        )
    if is_encrypted(src):
        raise InvalidRequestError(f"{src} is already encrypted")
    with src.open("rb") as source:
        size = os.fstat(source.fileno()).st_size
        header = _new_header(key, chunk_size, size)
        return _write_atomically(dst, header, key, _read_chunks(source, chunk_size, size))


def decrypt_to_fd(src: Path, key: bytes) -> int:
    """Decrypt `src` into a new sealed memfd (close-on-exec) and return its descriptor.

    Raises ModelDecryptionError for a wrong key, a damaged header or chunk, or a truncated
    file; the plaintext never touches disk.
    """
    fd = os.memfd_create(f"aicc-model:{src.name}"[:200], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with src.open("rb") as source:
            header = read_header(source, key, src)
            os.ftruncate(fd, header.plaintext_size)
            offset = 0
            for chunk in _decrypt_chunks(source, header, key):
                _pwrite_all(fd, chunk, offset)
                offset += len(chunk)
        # Nothing may change the plaintext llama.cpp is about to map.
        fcntl.fcntl(
            fd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL,
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


def decrypt_file(src: Path, dst: Path, key: bytes) -> str:
    """Write the plaintext of `src` to `dst` (atomically); return its sha256 hex.

    Raises ModelDecryptionError as `decrypt_to_fd` does; `dst` is then left untouched.
    """
    with src.open("rb") as source:
        header = read_header(source, key, src)
        digest = hashlib.sha256()
        tmp = _temp_path(dst)
        try:
            with tmp.open("wb") as out:
                for chunk in _decrypt_chunks(source, header, key):
                    digest.update(chunk)
                    out.write(chunk)
                _sync(out)
            os.replace(tmp, dst)
            _sync_dir(dst.parent)
        finally:
            tmp.unlink(missing_ok=True)
    return digest.hexdigest()


@contextmanager
def plaintext_paths(paths: list[Path], key: bytes | None) -> Iterator[list[Path]]:
    """Paths llama.cpp can open: plaintext files as they are, encrypted ones as
    `/proc/self/fd/N` of a memfd holding their plaintext. The fds close on exit (a model
    llama.cpp has mmapped keeps its pages).

    Raises ModelDecryptionError when a file is encrypted and `key` is None or wrong.
    """
    with ExitStack() as stack:
        usable: list[Path] = []
        for path in paths:
            if not is_encrypted(path):
                usable.append(path)
                continue
            if key is None:
                raise ModelDecryptionError(
                    f"{path.name} is encrypted but no model key is configured: set "
                    "model_key_file, model_key_command or the model_key_env variable"
                )
            fd = decrypt_to_fd(path, key)
            stack.callback(os.close, fd)
            usable.append(Path(f"/proc/self/fd/{fd}"))
        yield usable


def rotate_file(path: Path, old_key: bytes, new_key: bytes) -> None:
    """Re-encrypt `path` under `new_key`, in place and crash-safe: the new file is written
    and verified beside the old one, then renamed over it.

    Raises ModelDecryptionError when `old_key` does not open the file (nothing changes).
    """
    _check_key(new_key)
    with path.open("rb") as source:
        old = read_header(source, old_key, path)
        digest = hashlib.sha256()

        def plaintext() -> Iterator[bytes]:
            for chunk in _decrypt_chunks(source, old, old_key):
                digest.update(chunk)
                yield chunk

        header = _new_header(new_key, old.chunk_size, old.plaintext_size)
        tmp = _temp_path(path)
        try:
            _write_chunks(tmp, header, new_key, plaintext())
            with tmp.open("rb") as written:
                check = hashlib.sha256()
                for chunk in _decrypt_chunks(written, read_header(written, new_key, tmp), new_key):
                    check.update(chunk)
            if check.digest() != digest.digest():
                raise ModelDecryptionError(f"re-encrypting {path.name} did not verify")
            os.replace(tmp, path)
            _sync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)


def read_header(source: BinaryIO, key: bytes, path: Path) -> Header:
    """Parse and authenticate the header at the start of `source`; leaves it after the header.

    Raises ModelDecryptionError for a foreign file, another key, a damaged header, or a
    file whose length does not match the header (truncated or extended).
    """
    _check_key(key)
    raw = source.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or raw[: len(MAGIC)] != MAGIC:
        raise ModelDecryptionError(f"{path.name} is not an aicc encrypted model file")
    _, version, _, chunk_size, size, file_key_id, salt, nonce = _FIELDS.unpack(raw[: _FIELDS.size])
    if version != FORMAT_VERSION:
        raise ModelDecryptionError(
            f"{path.name} uses encrypted format version {version}; this aicc reads "
            f"version {FORMAT_VERSION}"
        )
    if not hmac.compare_digest(file_key_id, _key_id_bytes(key)):
        raise ModelDecryptionError(
            f"the model key does not match this file (key id {key_id(key)}, file key id "
            f"{file_key_id.hex()})"
        )
    _, mac_key = _file_keys(key, salt)
    expected = hmac.digest(mac_key, raw[: _FIELDS.size], "sha256")
    if not hmac.compare_digest(expected, raw[_FIELDS.size :]):
        raise ModelDecryptionError(
            f"the header of {path.name} failed authentication: the file is corrupted or was "
            "tampered with"
        )
    header = Header(chunk_size, size, file_key_id, salt, nonce)
    actual = os.fstat(source.fileno()).st_size
    if actual != header.file_size:
        state = "truncated" if actual < header.file_size else "extended"
        raise ModelDecryptionError(
            f"{path.name} is {state}: {actual} bytes where its header promises "
            f"{header.file_size}; the file is corrupted or was tampered with"
        )
    return header


# -- internals -------------------------------------------------------------------------------
def _key_id_bytes(key: bytes) -> bytes:
    return hmac.digest(key, _KEY_ID_LABEL, "sha256")[:8]


def _check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise InvalidRequestError(f"a model key is {KEY_BYTES} bytes, not {len(key)}")


def _file_keys(key: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """(AES key, header HMAC key) of one file."""
    derived = HKDF(hashes.SHA256(), 2 * KEY_BYTES, salt, _KDF_INFO).derive(key)
    return derived[:KEY_BYTES], derived[KEY_BYTES:]


def _new_header(key: bytes, chunk_size: int, size: int) -> Header:
    return Header(chunk_size, size, _key_id_bytes(key), os.urandom(16), os.urandom(12))


def _header_bytes(header: Header, key: bytes) -> bytes:
    fields = header.fields()
    _, mac_key = _file_keys(key, header.salt)
    return fields + hmac.digest(mac_key, fields, "sha256")


def _chunk_nonce(header: Header, index: int) -> bytes:
    counter = int.from_bytes(header.base_nonce, "big") ^ index
    return counter.to_bytes(len(header.base_nonce), "big")


def _chunk_aad(header_digest: bytes, index: int, is_last: bool) -> bytes:
    return header_digest + struct.pack(">QB", index, is_last)


def _read_chunks(source: BinaryIO, chunk_size: int, size: int) -> Iterator[bytes]:
    remaining = size
    while True:
        chunk = source.read(min(chunk_size, remaining))
        remaining -= len(chunk)
        yield chunk
        if remaining <= 0 or not chunk:
            break
    if remaining != 0 or source.read(1):
        raise InvalidRequestError("the file changed size while it was being encrypted")


def _write_chunks(dst: Path, header: Header, key: bytes, chunks: Iterator[bytes]) -> str:
    """Encrypt `chunks` (the plaintext, split at `header.chunk_size`) into `dst`."""
    aead = AESGCM(_file_keys(key, header.salt)[0])
    raw_header = _header_bytes(header, key)
    header_digest = hashlib.sha256(raw_header).digest()
    digest = hashlib.sha256()
    num_chunks = header.num_chunks
    with dst.open("wb") as out:
        out.write(raw_header)
        index = 0
        for index, chunk in enumerate(chunks):
            digest.update(chunk)
            aad = _chunk_aad(header_digest, index, index == num_chunks - 1)
            out.write(aead.encrypt(_chunk_nonce(header, index), chunk, aad))
        if index != num_chunks - 1:
            raise InvalidRequestError("the plaintext does not match its announced size")
        _sync(out)
    return digest.hexdigest()


def _write_atomically(dst: Path, header: Header, key: bytes, chunks: Iterator[bytes]) -> str:
    tmp = _temp_path(dst)
    try:
        sha256 = _write_chunks(tmp, header, key, chunks)
        os.replace(tmp, dst)
        _sync_dir(dst.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return sha256


def _decrypt_chunks(source: BinaryIO, header: Header, key: bytes) -> Iterator[bytes]:
    """The plaintext chunks of `source` (positioned after the header), each authenticated."""
    aead = AESGCM(_file_keys(key, header.salt)[0])
    header_digest = hashlib.sha256(_header_bytes(header, key)).digest()
    num_chunks = header.num_chunks
    remaining = header.plaintext_size
    for index in range(num_chunks):
        plain_len = min(header.chunk_size, remaining)
        sealed = source.read(plain_len + TAG_BYTES)
        aad = _chunk_aad(header_digest, index, index == num_chunks - 1)
        try:
            chunk = aead.decrypt(_chunk_nonce(header, index), sealed, aad)
        except (InvalidTag, ValueError):
            raise ModelDecryptionError(
                f"chunk {index} failed authentication: the file is corrupted or was tampered with"
            ) from None
        remaining -= plain_len
        yield chunk


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _temp_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def _sync(file: BinaryIO) -> None:
    file.flush()
    os.fsync(file.fileno())


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
