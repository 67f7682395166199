"""Credentials and the server secret: token formats, keyed hashes, sealed TOTP seeds.

Tokens are never stored: only HMAC-SHA-256(server secret, token), so a copy of the database
alone cannot be used to call the API, and lookups by hash need no per-row salt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aicc.config import Settings
from aicc.errors import ConfigError

API_KEY_PREFIX = "aicc-sk-"
SESSION_TOKEN_PREFIX = "aicc-st-"
MAX_TOKEN_LENGTH = 256
MIN_BARE_KEY_LENGTH = 32
"""An operator-chosen key without our prefix (`admin_key`) must be at least this long."""
SECRET_FILE_NAME = "secret.key"
TOTP_KEY_INFO = b"aicc totp"

_TOKEN_CHARS = re.compile(r"^[A-Za-z0-9_-]+$")
_KEY_ID = re.compile(r"^key_[0-9a-f]{12}$")
_SESSION_ID = re.compile(r"^ses_[0-9a-f]{12}$")
_NONCE_BYTES = 12


class SealError(Exception):
    """A sealed value was tampered with, or sealed under another server secret."""


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def new_session_token() -> str:
    return SESSION_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(6)


def new_session_id() -> str:
    return "ses_" + secrets.token_hex(6)


def is_key_id(value: str) -> bool:
    return bool(_KEY_ID.fullmatch(value))


def is_session_id(value: str) -> bool:
    return bool(_SESSION_ID.fullmatch(value))


def token_hint(token: str) -> str:
    """Enough of a key to recognise it in a list, not enough to guess it."""
    return token[:12] + "…"


def is_plausible_token(value: str) -> bool:
    """Whether `value` could be a key or session token at all. Anything else is refused before
    it is hashed or sent to the database (cheap rejection of junk and oversized input)."""
    return 0 < len(value) <= MAX_TOKEN_LENGTH and bool(_TOKEN_CHARS.fullmatch(value))


def is_session_token(value: str) -> bool:
    return value.startswith(SESSION_TOKEN_PREFIX) and is_plausible_token(value)


def is_api_key(value: str) -> bool:
    """Our own keys, or an operator-chosen bootstrap key of at least 32 token characters."""
    if not is_plausible_token(value) or value.startswith(SESSION_TOKEN_PREFIX):
        return False
    return value.startswith(API_KEY_PREFIX) or len(value) >= MIN_BARE_KEY_LENGTH


def keyed_hash(secret: bytes, token: str) -> str:
    """HMAC-SHA-256 of the whole token, hex: what the database stores and is searched by."""
    return hmac.new(secret, token.encode(), hashlib.sha256).hexdigest()


def hashes_equal(left: str, right: str) -> bool:
    return hmac.compare_digest(left.encode(), right.encode())


def load_server_secret(settings: Settings) -> bytes:
    """The server secret: `settings.secret_key`, else `<state_dir>/secret.key` (32 random bytes,
    hex), created with mode 0600 on first use.

    Raises ConfigError when the file is readable by group or others, or is not valid hex.
    """
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    path = settings.state_dir / SECRET_FILE_NAME
    if not path.exists():
        _create_secret_file(path)
    return _read_secret_file(path)


def _create_secret_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        # O_EXCL: two processes starting together must not both write (and disagree).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32) + "\n")


def _read_secret_file(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path} is accessible by group or others (mode {stat.filemode(mode)}); "
            f"run `chmod 600 {path}`"
        )
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise ConfigError(
            f"{path} does not hold a hex secret; delete it to make a new one"
        ) from None
    if len(secret) < 32:
        raise ConfigError(f"{path} holds fewer than 32 bytes; delete it to make a new one")
    return secret


def _derive_key(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def seal(secret: bytes, plaintext: bytes, *, context: bytes, info: bytes = TOTP_KEY_INFO) -> str:
    """AES-256-GCM under a key derived from the server secret; base64(nonce ‖ ciphertext).

    `context` is authenticated, not stored: a value sealed for one user does not open for
    another, so rows cannot be swapped in the database.
    """
    nonce = os.urandom(_NONCE_BYTES)
    ciphertext = AESGCM(_derive_key(secret, info)).encrypt(nonce, plaintext, context)
    return base64.b64encode(nonce + ciphertext).decode()


def open_sealed(
    secret: bytes, sealed: str, *, context: bytes, info: bytes = TOTP_KEY_INFO
) -> bytes:
    """Reverse `seal`. Raises SealError when the value or its context does not authenticate."""
    try:
        raw = base64.b64decode(sealed, validate=True)
    except binascii.Error:
        raise SealError("sealed value is not base64") from None
    if len(raw) <= _NONCE_BYTES:
        raise SealError("sealed value is too short")
    nonce, ciphertext = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
    try:
        return AESGCM(_derive_key(secret, info)).decrypt(nonce, ciphertext, context)
    except InvalidTag:
        raise SealError("sealed value does not authenticate") from None
