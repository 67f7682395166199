"""The state database's tables (SQLAlchemy 2 declarative). Schema changes go through a new
migration in `migrations/versions/`; a test checks that the two agree."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone: stored naive UTC)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use aware UTC datetimes")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UtcDateTime()}


class User(Base):
    """A person or service account, local (password) or from the directory (LDAP)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(128), unique=True)
    display_name: Mapped[str | None] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(String(16), default="local")
    """``local`` or ``ldap``."""
    password_hash: Mapped[str | None] = mapped_column(String(256))
    """argon2id (PHC string); None for directory users and key-only accounts."""
    is_disabled: Mapped[bool] = mapped_column(default=False)
    num_failed_logins: Mapped[int] = mapped_column(default=0)
    locked_until: Mapped[datetime | None]
    totp_secret: Mapped[str | None] = mapped_column(String(512))
    """The TOTP seed, encrypted with the server secret (AES-256-GCM, base64)."""
    is_totp_enabled: Mapped[bool] = mapped_column(default=False)
    totp_last_step: Mapped[int | None]
    """The last accepted TOTP time step (a code is never accepted twice)."""
    rpm: Mapped[int | None]
    tpm: Mapped[int | None]
    tpd: Mapped[int | None]
    max_streams: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    last_login_at: Mapped[datetime | None]

    roles: Mapped[list[Role]] = relationship(secondary="user_roles", lazy="selectin")


class Role(Base):
    """A named set of permissions and of models its holders may use."""

    __tablename__ = "roles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(String(512), default="")
    is_builtin: Mapped[bool] = mapped_column(default=False)
    permissions: Mapped[list[str]] = mapped_column(JSON, default=list)
    models: Mapped[list[str]] = mapped_column(JSON, default=list)
    """Model names or glob patterns (``deepseek-*``, ``*``) this role may use."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class UserRole(Base):
    __tablename__ = "user_roles"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    role_id: Mapped[int] = mapped_column(
        ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True
    )


class ApiKey(Base):
    """An API key; only its keyed hash is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    """Public id (``key_…``) used by the admin API and in audit records."""
    hint: Mapped[str] = mapped_column(String(32))
    """The first characters of the key, to recognise it in lists (``aicc-sk-AbC1…``)."""
    key_hash: Mapped[str] = mapped_column(String(128), unique=True)
    """HMAC-SHA-256 of the whole key with the server secret (hex)."""
    name: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    scopes: Mapped[list[str] | None] = mapped_column(JSON)
    """Permissions this key may use (None: all of its owner's)."""
    models: Mapped[list[str] | None] = mapped_column(JSON)
    """Model patterns this key may use (None: all of its owner's)."""
    rpm: Mapped[int | None]
    tpm: Mapped[int | None]
    tpd: Mapped[int | None]
    max_streams: Mapped[int | None]
    expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    user: Mapped[User] = relationship(lazy="joined")


class AuthSession(Base):
    """A login session (CLI, web console); only its token's keyed hash is stored."""

    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[str] = mapped_column(String(32), unique=True)
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    is_mfa: Mapped[bool] = mapped_column(default=False)
    """The login presented a valid second factor."""
    client: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]

    user: Mapped[User] = relationship(lazy="joined")


class DailyUsage(Base):
    """Tokens used per subject per UTC day: the tokens-per-day quota survives restarts."""

    __tablename__ = "daily_usage"
    __table_args__ = (UniqueConstraint("subject", "day"), Index("ix_daily_usage_day", "day"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subject: Mapped[str] = mapped_column(String(64))
    """``user:<id>`` or ``key:<key_id>``."""
    day: Mapped[str] = mapped_column(String(10))
    """UTC date, ``YYYY-MM-DD``."""
    num_tokens: Mapped[int] = mapped_column(default=0)


class AuditEntryRow(Base):
    """One hash-chained audit entry (`aicc.audit`). Written only by the audit writer thread;
    never updated. `hash` = SHA-256(prev_hash ‖ canonical JSON of every other column)."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_time", "time"),
        Index("ix_audit_log_username", "username"),
        Index("ix_audit_log_model", "model"),
    )

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    """Contiguous from 1, in commit order."""
    time: Mapped[datetime]
    action: Mapped[str] = mapped_column(String(64))
    """``api.call``, ``audit.purge``, ``audit.recovered``, …"""
    request_id: Mapped[str | None] = mapped_column(String(128))
    username: Mapped[str | None] = mapped_column(String(128))
    user_id: Mapped[int | None]
    key_id: Mapped[str | None] = mapped_column(String(32))
    session_id: Mapped[str | None] = mapped_column(String(32))
    roles: Mapped[list[str]] = mapped_column(JSON)
    client_addr: Mapped[str | None] = mapped_column(String(64))
    method: Mapped[str | None] = mapped_column(String(16))
    route: Mapped[str | None] = mapped_column(String(256))
    path: Mapped[str | None] = mapped_column(String(2048))
    model: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[int]
    latency_ms: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    error_code: Mapped[str | None] = mapped_column(String(64))
    body_sha256: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    prompt_enc: Mapped[str | None] = mapped_column(Text)
    """AES-256-GCM, base64(nonce ‖ ciphertext); only with `audit_capture_content`."""
    completion_enc: Mapped[str | None] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditOpenCall(Base):
    """A streamed call in progress: committed before its response headers go out, deleted in
    the transaction that appends its entry. Rows left by a crash become ``audit.recovered``."""

    __tablename__ = "audit_open"

    call_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    opened_at: Mapped[datetime]
    request_id: Mapped[str | None] = mapped_column(String(128))
    fields: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The entry as known when the call opened (`AuditEntry.to_fields()`)."""


class ModelRow(Base):
    """A model in the local store (`aicc.store.registry`): its files live in
    ``<model_dir>/<name>/<tag>/``."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "tag"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    tag: Mapped[str] = mapped_column(String(128), default="latest")
    source: Mapped[str] = mapped_column(Text)
    """``hf:<repo>@<revision>``, ``import:<abs path>``, ``quantize:<parent ref>``."""
    files: Mapped[list[str]] = mapped_column(JSON)
    """File names in the model's directory, in load order (part 1 first)."""
    sha256: Mapped[list[str]] = mapped_column(JSON)
    """SHA-256 (hex) of each file's plaintext, in the order of `files`."""
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    """Plaintext size of all files together."""
    architecture: Mapped[str | None] = mapped_column(String(64))
    parameter_count: Mapped[int | None] = mapped_column(BigInteger)
    quantization: Mapped[str | None] = mapped_column(String(32))
    context_length: Mapped[int | None]
    chat_template: Mapped[str | None] = mapped_column(Text)
    encrypted: Mapped[bool] = mapped_column(default=False)
    parent: Mapped[str | None] = mapped_column(String(257))
    """The model this one was derived from (``name:tag``), e.g. by quantization."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class DeploymentWeightRow(Base):
    """A deployment variant's weight as last set by promote, rollback or a weight change; it
    outlives a restart (the config's weights only apply to variants without a row)."""

    __tablename__ = "deployment_weights"

    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    variant: Mapped[str] = mapped_column(String(64), primary_key=True)
    weight: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(256))
    """Who set it: a username, or `auto-rollback`."""


class DeploymentRow(Base):
    """A deployment made through the admin API (config-file deployments are not stored).

    `settings` is the validated `DeploymentSettings` as JSON, each literal upstream key
    replaced by its ciphertext (`api_key_encrypted`, see `router/keys.py`); its variant
    weights are the current ones (promote, rollback and weight changes update them)."""

    __tablename__ = "deployments"

    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(256))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(256))


class FeedbackRow(Base):
    """A user's rating of one of their own calls (`POST /v1/feedback`), for comparing a
    deployment's variants. A second rating of the same call replaces the first."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("request_id", "user_id"),
        Index("ix_feedback_model", "model"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128))
    """The rated call's request id (its audit entry's)."""
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(256))
    """The rated call's model, from its audit entry."""
    variant: Mapped[str] = mapped_column(String(64))
    """The deployment variant that served the call ("" when it was not routed)."""
    rating: Mapped[int]
    """1 (positive) or -1 (negative)."""
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    """When the current rating was given (a replacement sets it again)."""
