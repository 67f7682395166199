"""Permissions, the built-in roles, and model allow-lists.

Duties are separated: `admin` runs the system and its models, `security` manages people and
credentials, `auditor` only reads the audit log, `user` runs inference. Nobody but `admin`
holds a `*:write` on configuration, and `security` cannot use models unless also a `user`.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Permission(StrEnum):
    INFERENCE = "inference"
    """Chat, completions, embeddings, tokenize, model list (on allowed models)."""
    KEYS_SELF = "keys:self"
    """Create, list and revoke one's own API keys."""
    MODELS_READ = "models:read"
    MODELS_WRITE = "models:write"
    CONFIG_READ = "config:read"
    CONFIG_WRITE = "config:write"
    USERS_READ = "users:read"
    USERS_WRITE = "users:write"
    KEYS_READ = "keys:read"
    KEYS_WRITE = "keys:write"
    ROLES_READ = "roles:read"
    ROLES_WRITE = "roles:write"
    AUDIT_READ = "audit:read"
    AUDIT_PURGE = "audit:purge"
    """Purge audit entries older than the retention (itself audited)."""
    METRICS_READ = "metrics:read"
    """`GET /metrics` on the main port (unless `metrics_public`)."""
    VARIANT_SELECT = "inference:variant"
    """Pick a deployment's variant with the `X-AICC-Variant` header (testers)."""
    DEPLOY = "deployments:write"
    """Promote, roll back and re-weight deployments' variants."""


ALL_PERMISSIONS = frozenset(Permission)


@dataclass(frozen=True, slots=True)
class BuiltinRole:
    name: str
    description: str
    permissions: frozenset[Permission]
    models: tuple[str, ...]


BUILTIN_ROLES: tuple[BuiltinRole, ...] = (
    BuiltinRole(
        "admin",
        "System configuration and models",
        frozenset(
            {
                Permission.INFERENCE,
                Permission.KEYS_SELF,
                Permission.MODELS_READ,
                Permission.MODELS_WRITE,
                Permission.CONFIG_READ,
                Permission.CONFIG_WRITE,
                Permission.AUDIT_PURGE,
                Permission.METRICS_READ,
                Permission.VARIANT_SELECT,
                Permission.DEPLOY,
            }
        ),
        ("*",),
    ),
    BuiltinRole(
        "security",
        "Users, roles and API keys",
        frozenset(
            {
                Permission.KEYS_SELF,
                Permission.USERS_READ,
                Permission.USERS_WRITE,
                Permission.KEYS_READ,
                Permission.KEYS_WRITE,
                Permission.ROLES_READ,
                Permission.ROLES_WRITE,
            }
        ),
        (),
    ),
    BuiltinRole(
        "auditor",
        "Reads the audit log and metrics; changes nothing",
        frozenset({Permission.AUDIT_READ, Permission.METRICS_READ}),
        (),
    ),
    BuiltinRole(
        "user",
        "Inference on the models its roles allow",
        frozenset({Permission.INFERENCE, Permission.KEYS_SELF}),
        ("*",),
    ),
)

PRIVILEGED_ROLES = frozenset({"admin", "security", "auditor"})
"""Roles that need a second factor when `mfa_required` is on."""

_ROLE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_MODEL_PATTERN = re.compile(r"^[A-Za-z0-9*?._:/-]{1,256}$")


def is_valid_role_name(name: str) -> bool:
    return bool(_ROLE_NAME.fullmatch(name))


def is_valid_model_pattern(pattern: str) -> bool:
    """Names and globs (``*``, ``?``); no character classes, so a pattern cannot be expensive."""
    return bool(_MODEL_PATTERN.fullmatch(pattern))


def parse_permissions(values: Iterable[str]) -> frozenset[Permission]:
    """Raise ValueError naming the first unknown permission."""
    result = set()
    for value in values:
        try:
            result.add(Permission(value))
        except ValueError:
            raise ValueError(f"unknown permission {value!r}") from None
    return frozenset(result)


def model_allowed(name: str, patterns: Iterable[str]) -> bool:
    patterns = tuple(patterns)
    if "*" in patterns:  # the built-in roles' pattern: no matching needed
        return True
    return _matches_any(name, patterns)


@functools.lru_cache(maxsize=4096)
def _matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    # Cached: a caller asks about the same few models on every request.
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def patterns_within(narrow: Iterable[str], wide: Iterable[str]) -> bool:
    """Whether every pattern in `narrow` only admits names that `wide` admits (conservative:
    a glob in `narrow` must be matched by a pattern of `wide` taken as a glob over globs)."""
    wide = list(wide)
    return all(model_allowed(pattern, wide) for pattern in narrow)


FREELY_GRANTED = frozenset(
    {
        Permission.INFERENCE,
        Permission.KEYS_SELF,
        Permission.AUDIT_READ,
        Permission.METRICS_READ,
        Permission.VARIANT_SELECT,  # only picks among variants an admin deployed
    }
)
"""Permissions any holder of `users:write` (or `roles:write`) may hand out. Every other one can
only be granted by someone who holds it, so the `security` role cannot mint an administrator."""


def ungrantable(granted: Iterable[str], held: Iterable[str]) -> list[str]:
    """The permissions in `granted` that a caller holding `held` may not hand out."""
    allowed = set(held) | FREELY_GRANTED
    return sorted(set(granted) - allowed)
