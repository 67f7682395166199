"""Audit entries: what one call or event leaves in the log, and the optional sealed content.

Entries are built on the event loop (cheap: no I/O) with seq 0 and no hashes; the writer thread
numbers and chains them in commit order.
"""

from __future__ import annotations

import base64
import binascii
import operator
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aicc.api.record import CallOutcome, CallRecord
from aicc.audit.chain import clean_text, format_time, link_hash, sanitize
from aicc.auth.principal import Principal
from aicc.config import Settings
from aicc.errors import ConfigError

CONTENT_KEY_ENV = "AICC_AUDIT_CONTENT_KEY"
_NONCE_BYTES = 12
_MAX_LENGTHS = {
    "action": 64,
    "request_id": 128,
    "username": 128,
    "key_id": 32,
    "session_id": 32,
    "client_addr": 64,
    "method": 16,
    "route": 256,
    "path": 2048,
    "model": 256,
    "finish_reason": 32,
    "error_code": 64,
    "body_sha256": 64,
}
"""Column widths (`aicc.db.models.AuditEntryRow`): PostgreSQL refuses longer values, and one bad
entry must not fail the batch it is committed with."""


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One record of the audit log (table `audit_log`)."""

    seq: int
    """Position in the chain, contiguous from 1 (0 until the writer numbers it)."""
    time: datetime
    """When the call started (events: when they happened), UTC."""
    action: str
    """`api.call`, `audit.purge`, `audit.recovered`, …"""
    status: int
    """HTTP status sent (499: client went away; 0: unknown, the server stopped first)."""
    request_id: str | None = None
    username: str | None = None
    user_id: int | None = None
    key_id: str | None = None
    session_id: str | None = None
    roles: tuple[str, ...] = ()
    client_addr: str | None = None
    method: str | None = None
    route: str | None = None
    path: str | None = None
    model: str | None = None
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error_code: str | None = None
    body_sha256: str | None = None
    detail: dict[str, Any] | None = None
    """What an administrative call or an event changed (never a secret)."""
    prompt_enc: str | None = None
    """The prompt, AES-256-GCM, base64(nonce ‖ ciphertext); only with content capture."""
    completion_enc: str | None = None
    prev_hash: str = ""
    hash: str = ""

    def hashed_fields(self) -> dict[str, Any]:
        """Every field but the two hashes, as the chain hashes them."""
        values = dict(zip(_HASHED_FIELDS, _hashed_values(self), strict=True))
        values["time"] = format_time(self.time)
        values["roles"] = list(self.roles)
        return values

    def compute_hash(self) -> str:
        return link_hash(self.prev_hash, self.hashed_fields())

    def chained(self, seq: int, prev_hash: str) -> AuditEntry:
        """This entry at `seq`, linked to `prev_hash`, with its own hash."""
        hash_, _ = self.link(seq, prev_hash)
        return replace(self, seq=seq, prev_hash=prev_hash, hash=hash_)

    def link(self, seq: int, prev_hash: str) -> tuple[str, str]:
        """(hash, time as hashed) of this entry at `seq` after `prev_hash`, without making
        the chained entry (the writer inserts the values straight away)."""
        values = self.hashed_fields()
        values["seq"] = seq
        return link_hash(prev_hash, values), values["time"]

    def to_row(self) -> dict[str, Any]:
        """Column values for `audit_log`."""
        row = {name: getattr(self, name) for name in _ALL_FIELDS}
        row["roles"] = list(self.roles)
        return row

    def to_json(self) -> dict[str, Any]:
        """JSON-safe values (time as text), e.g. for an `audit_open` row or an export."""
        return {**self.to_row(), "time": format_time(self.time)}

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> AuditEntry:
        """From `audit_log` columns or `to_json()` output."""
        values = {name: row[name] for name in _ALL_FIELDS if name in row}
        time = values["time"]
        if isinstance(time, str):
            values["time"] = datetime.fromisoformat(time)
        values["roles"] = tuple(values.get("roles") or ())
        return cls(**values)


_ALL_FIELDS = tuple(f.name for f in fields(AuditEntry))
_HASHED_FIELDS = tuple(name for name in _ALL_FIELDS if name not in ("prev_hash", "hash"))
_hashed_values = operator.attrgetter(*_HASHED_FIELDS)


CallValues = tuple[Any, ...]
"""A call's raw audit values, in `_CALL_FIELDS` order: cheap to build on the event loop and to
send to the writer process, which makes the entry (`entry_from_values`)."""

_CALL_FIELDS = (
    "action", "started_at", "status", "request_id", "username", "user_id", "key_id",
    "session_id", "roles", "client_addr", "method", "route", "path", "model", "latency_s",
    "prompt_tokens", "completion_tokens", "finish_reason", "error_code", "body_sha256",
    "detail", "prompt_text", "completion_text",
)  # fmt: skip


def call_values(record: CallRecord, outcome: CallOutcome, action: str = "api.call") -> CallValues:
    """The raw values of one finished (or, for `open_call`, started) HTTP call."""
    principal = record.principal
    if principal is None:
        username = user_id = key_id = session_id = None
        roles: tuple[str, ...] = ()
    else:
        username, user_id, key_id = principal.username, principal.user_id, principal.key_id
        session_id = principal.credential_id if principal.via == "session" else None
        roles = principal.roles
    completion = "".join(record.completion_text) if record.completion_text else None
    return (
        action, record.started_at, outcome.status, record.request_id, username, user_id,
        key_id, session_id, roles, outcome.client_addr, outcome.method, outcome.route,
        outcome.path, record.model, outcome.latency_s, record.num_prompt_tokens,
        record.num_completion_tokens, record.finish_reason, record.error_code,
        outcome.body_sha256, record.detail, record.prompt_text, completion,
    )  # fmt: skip


def entry_from_values(values: CallValues, cipher: ContentCipher | None = None) -> AuditEntry:
    """The entry of a call from `call_values` (content sealed when `cipher` is given).

    Raises TypeError when the call's detail holds a value JSON cannot hold, ValueError when
    `values` is not a call's values.
    """
    if len(values) != len(_CALL_FIELDS):
        raise ValueError(f"{len(values)} audit call values, expected {len(_CALL_FIELDS)}")
    call = dict(zip(_CALL_FIELDS, values, strict=True))
    prompt_text, completion_text = call.pop("prompt_text"), call.pop("completion_text")
    prompt_enc = completion_enc = None
    if cipher is not None:
        if prompt_text is not None:
            prompt_enc = cipher.seal(prompt_text, call["request_id"], "prompt")
        if completion_text:
            completion_enc = cipher.seal(completion_text, call["request_id"], "completion")
    latency_s = call.pop("latency_s")
    return _make(
        seq=0,
        time=datetime.fromtimestamp(call.pop("started_at"), UTC),
        latency_ms=round(latency_s * 1000, 3),
        prompt_enc=prompt_enc,
        completion_enc=completion_enc,
        **call,
    )


def entry_from_call(
    record: CallRecord,
    outcome: CallOutcome,
    *,
    action: str = "api.call",
    cipher: ContentCipher | None = None,
) -> AuditEntry:
    """The entry of one finished (or, for `open_call`, started) HTTP call.

    Raises TypeError when `record.detail` holds a value JSON cannot hold.
    """
    return entry_from_values(call_values(record, outcome, action), cipher)


def event_entry(
    *,
    action: str,
    principal: Principal | None,
    detail: dict[str, Any],
    status: int = 200,
    time: datetime | None = None,
) -> AuditEntry:
    """An entry that is not an HTTP call: a purge, a start-up, a recovery.

    Raises TypeError when `detail` holds a value JSON cannot hold.
    """
    return _make(
        seq=0,
        time=time or datetime.now(UTC),
        action=action,
        status=status,
        detail=detail,
        **_principal_fields(principal),
    )


def recovered_entry(open_fields: Mapping[str, Any]) -> AuditEntry:
    """The entry of a streamed call whose server stopped before it ended (an `audit_open`
    row found at start-up): action `audit.recovered`, status 0 (unknown)."""
    opened = AuditEntry.from_row(open_fields)
    detail: dict[str, Any] = {"reason": "the server stopped before the call ended"}
    if opened.detail is not None:
        detail["detail"] = opened.detail
    return replace(
        opened,
        seq=0,
        action="audit.recovered",
        status=0,
        latency_ms=None,
        detail=detail,
        prev_hash="",
        hash="",
    )


def _principal_fields(principal: Principal | None) -> dict[str, Any]:
    if principal is None:
        return {}
    return {
        "username": principal.username,
        "user_id": principal.user_id,
        "key_id": principal.key_id,
        "session_id": principal.credential_id if principal.via == "session" else None,
        "roles": principal.roles,
    }


def _make(**values: Any) -> AuditEntry:
    """An entry with strings cut to their columns and `detail` made to read back exactly as
    hashed (see `sanitize`)."""
    for name, limit in _MAX_LENGTHS.items():
        value = values.get(name)
        if value is not None:
            values[name] = clean_text(value, limit)
    values["roles"] = tuple(clean_text(role) for role in values.get("roles", ()))
    if values.get("detail") is not None:
        values["detail"] = sanitize(values["detail"])
    values["time"] = values["time"].astimezone(UTC)
    return AuditEntry(**values)


class ContentCipher:
    """AES-256-GCM for captured prompts and completions. The request id and the part name are
    authenticated, so sealed content cannot be moved to another entry unnoticed."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ConfigError("the audit content key must be 32 bytes (64 hex characters)")
        self.key = key
        self._aead = AESGCM(key)

    def seal(self, text: str, request_id: str, part: str) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, text.encode(), f"{request_id}\0{part}".encode())
        return base64.b64encode(nonce + sealed).decode()

    def open(self, sealed: str, request_id: str, part: str) -> str:
        """Raises ValueError when the value is damaged or was sealed under another key/entry."""
        try:
            raw = base64.b64decode(sealed, validate=True)
            plain = self._aead.decrypt(
                raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], f"{request_id}\0{part}".encode()
            )
        except (binascii.Error, InvalidTag, ValueError):
            raise ValueError(f"sealed {part} of request {request_id} does not open") from None
        return plain.decode()


def load_content_cipher(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> ContentCipher | None:
    """The cipher for captured content; None when capture is off.

    Raises ConfigError when capture is on without a key, or the key is malformed, or its file
    is readable by group or others.
    """
    if not settings.audit_capture_content:
        return None
    environ = os.environ if environ is None else environ
    path = settings.audit_content_key_file
    if path is not None:
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"audit_content_key_file {path} cannot be read: {exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{path} is accessible by group or others; run `chmod 600 {path}`")
        source = str(path)
    elif CONTENT_KEY_ENV in environ:
        text, source = environ[CONTENT_KEY_ENV], CONTENT_KEY_ENV
    else:
        raise ConfigError(
            "audit_capture_content is on but no key is given: set audit_content_key_file or "
            f"{CONTENT_KEY_ENV} (64 hex characters, e.g. from `openssl rand -hex 32`)"
        )
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ConfigError(f"{source} does not hold a hex key") from None
    if len(key) != 32:
        raise ConfigError(f"{source} must hold 64 hex characters (32 bytes)")
    return ContentCipher(key)
