"""The authenticated caller, as every policy check sees it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from aicc.auth.permissions import Permission, model_allowed

_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


def is_valid_username(username: str) -> bool:
    """aicc login names (local and directory): anything else is refused before it reaches SQL
    or an LDAP filter."""
    return bool(_USERNAME.fullmatch(username))


@dataclass(frozen=True, slots=True)
class Limits:
    """Rate limits and quotas of a user or a key (None: unlimited)."""

    rpm: int | None = None
    """Requests per minute."""
    tpm: int | None = None
    """Tokens (prompt + completion) per minute."""
    tpd: int | None = None
    """Tokens per UTC day."""
    max_streams: int | None = None
    """Generations in flight at once."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. Permissions and models are already narrowed to the key's scopes."""

    user_id: int
    username: str
    roles: tuple[str, ...]
    permissions: frozenset[Permission]
    models: tuple[str, ...]
    """Model name patterns this caller may use."""
    via: Literal["key", "session"]
    credential_id: str
    """The key's `key_…` id or the session's `ses_…` id (for audit records and revocation)."""
    user_limits: Limits
    key_limits: Limits | None = None
    is_mfa: bool = False
    """A session opened with a second factor."""

    @property
    def key_id(self) -> str | None:
        return self.credential_id if self.via == "key" else None

    def can(self, permission: Permission) -> bool:
        return permission in self.permissions

    def can_use_model(self, name: str) -> bool:
        return Permission.INFERENCE in self.permissions and model_allowed(name, self.models)

    @property
    def tenant(self) -> str:
        """The prefix-cache partition: one per user."""
        return f"user:{self.user_id}"
