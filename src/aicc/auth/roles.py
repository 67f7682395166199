"""Roles: the built-in four (refreshed at every start) and custom ones."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from aicc.auth.base import ServiceBase
from aicc.auth.permissions import (
    BUILTIN_ROLES,
    is_valid_model_pattern,
    is_valid_role_name,
    parse_permissions,
)
from aicc.auth.views import RoleView, role_view
from aicc.db.models import Role, UserRole
from aicc.errors import ConflictError, InvalidRequestError, NotFoundError

MAX_DESCRIPTION_LENGTH = 512
MAX_MODEL_PATTERNS = 256


def check_permissions(values: Iterable[str], *, param: str) -> list[str]:
    """Sorted, deduplicated; raises InvalidRequestError naming an unknown permission."""
    if isinstance(values, str):
        raise InvalidRequestError(f"{param} must be a list of permissions", param=param)
    try:
        return sorted(parse_permissions(values))
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param=param) from None


def check_model_patterns(values: Iterable[str], *, param: str) -> list[str]:
    """Deduplicated in order; raises InvalidRequestError naming an invalid pattern."""
    if isinstance(values, str):
        raise InvalidRequestError(f"{param} must be a list of model patterns", param=param)
    patterns = list(dict.fromkeys(values))
    if len(patterns) > MAX_MODEL_PATTERNS:
        raise InvalidRequestError(f"at most {MAX_MODEL_PATTERNS} model patterns", param=param)
    for pattern in patterns:
        if not is_valid_model_pattern(pattern):
            raise InvalidRequestError(
                f"{pattern[:64]!r} is not a model name or pattern "
                "(letters, digits, . _ : / - and the wildcards * ?)",
                param=param,
            )
    return patterns


def _check_description(description: str) -> str:
    if len(description) > MAX_DESCRIPTION_LENGTH:
        raise InvalidRequestError(
            f"description must be at most {MAX_DESCRIPTION_LENGTH} characters",
            param="description",
        )
    return description


class RoleAdmin(ServiceBase):
    def ensure_builtin_roles(self) -> None:
        """Create the built-in roles, or reset them to this version's definition (idempotent)."""
        with self._db.session() as session:
            existing = {role.name: role for role in session.scalars(select(Role))}
            for builtin in BUILTIN_ROLES:
                role = existing.get(builtin.name)
                if role is None:
                    role = Role(name=builtin.name)
                    session.add(role)
                role.description = builtin.description
                role.permissions = sorted(builtin.permissions)
                role.models = list(builtin.models)
                role.is_builtin = True

    def create_role(
        self,
        name: str,
        *,
        permissions: Iterable[str],
        models: Iterable[str],
        description: str = "",
    ) -> RoleView:
        """Raises InvalidRequestError (bad name, permission or pattern), ConflictError (taken)."""
        if not is_valid_role_name(name):
            raise InvalidRequestError(
                "role name must be 1-64 of a-z 0-9 _ -, starting with a letter", param="name"
            )
        role = Role(
            name=name,
            description=_check_description(description),
            permissions=check_permissions(permissions, param="permissions"),
            models=check_model_patterns(models, param="models"),
            is_builtin=False,
        )
        try:
            with self._db.session() as session:
                if session.scalars(select(Role.id).where(Role.name == name)).first() is not None:
                    raise ConflictError(f"role {name!r} already exists", param="name")
                session.add(role)
        except IntegrityError:  # created concurrently by another gateway
            raise ConflictError(f"role {name!r} already exists", param="name") from None
        return role_view(role)

    def list_roles(self) -> list[RoleView]:
        with self._db.session() as session:
            return [role_view(role) for role in session.scalars(select(Role).order_by(Role.name))]

    def get_role(self, name: str) -> RoleView:
        """Raises NotFoundError."""
        with self._db.session() as session:
            return role_view(self._get_role(session, name))

    def update_role(
        self,
        name: str,
        *,
        permissions: Iterable[str] | None = None,
        models: Iterable[str] | None = None,
        description: str | None = None,
    ) -> RoleView:
        """Raises NotFoundError, ConflictError (built-in roles are immutable),
        InvalidRequestError."""
        with self._db.session() as session:
            role = self._get_role(session, name)
            if role.is_builtin:
                raise ConflictError(f"built-in role {name!r} cannot be changed", param="name")
            if permissions is not None:
                role.permissions = check_permissions(permissions, param="permissions")
            if models is not None:
                role.models = check_model_patterns(models, param="models")
            if description is not None:
                role.description = _check_description(description)
            return role_view(role)

    def delete_role(self, name: str) -> None:
        """Raises NotFoundError, ConflictError (built-in, or still held by users)."""
        with self._db.session() as session:
            role = self._get_role(session, name)
            if role.is_builtin:
                raise ConflictError(f"built-in role {name!r} cannot be deleted", param="name")
            num_holders = session.scalar(
                select(func.count()).select_from(UserRole).where(UserRole.role_id == role.id)
            )
            if num_holders:
                raise ConflictError(
                    f"role {name!r} is held by {num_holders} user(s); remove it from them first",
                    param="name",
                )
            session.delete(role)

    def _get_role(self, session: Session, name: str) -> Role:
        role = None
        if is_valid_role_name(name):
            role = session.scalars(select(Role).where(Role.name == name)).one_or_none()
        if role is None:
            # The value is not echoed: it may be a misplaced password or key.
            raise NotFoundError("no such role", param="name")
        return role
