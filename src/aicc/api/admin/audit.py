"""/admin/audit: read, export and purge the audit log (the `auditor` role's duty; purging is
`audit:purge`, and every purge is itself audited by the audit log)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from aicc.api.admin.protocol import Json
from aicc.audit import AuditLog
from aicc.audit.ecs import to_ecs
from aicc.audit.entries import AuditEntry
from aicc.audit.query import query
from aicc.audit.retention import retention_cut
from aicc.auth.deps import require
from aicc.auth.permissions import Permission
from aicc.auth.principal import Principal
from aicc.config import Settings
from aicc.errors import EngineUnavailableError, InvalidRequestError, NotFoundError

router = APIRouter(prefix="/admin/audit", tags=["admin"])

MAX_PAGE = 1000
EXPORT_PAGE = 500
"""Entries read per database round trip while exporting (bounded memory for any export)."""


def audit_reader() -> Any:
    """The read check of every /admin/audit route: `audit:read`, and with
    `audit_admin_read: true` also holders of `config:read` (the admin role), read-only."""
    return require(Permission.AUDIT_READ, also_admit=_admin_may_read)


def _admin_may_read(request: Request, principal: Principal) -> bool:
    settings: Settings = request.app.state.settings
    return settings.audit_admin_read and principal.can(Permission.CONFIG_READ)


Reader = Annotated[Principal, audit_reader()]
Purger = Annotated[Principal, require(Permission.AUDIT_PURGE)]


class _Filters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: datetime | None = None
    """Entries at or after this time (ISO-8601; no time zone means UTC)."""
    until: datetime | None = None
    """Entries before this time."""
    user: str | None = Field(default=None, min_length=1, max_length=128)
    model: str | None = Field(default=None, min_length=1, max_length=256)
    status: int | None = Field(default=None, ge=0, le=599)
    """HTTP status (0: a call the server never finished, recovered after a crash)."""
    action: str | None = Field(default=None, min_length=1, max_length=64)
    """`api.call`, `audit.purge`, `audit.recovered`, …"""
    after_seq: int | None = Field(default=None, ge=0)
    """Entries after this sequence number (the previous page's `next_after_seq`)."""


class PageFilters(_Filters):
    limit: int = Field(default=100, ge=1, le=MAX_PAGE)


class ExportFilters(_Filters):
    limit: int | None = Field(default=None, ge=1)
    """At most this many entries (default: all that match)."""


class PurgeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    before: datetime
    """Delete entries older than this (ISO-8601; no time zone means UTC)."""


async def get_audit_log(request: Request) -> AuditLog:
    """Raises NotFoundError when the audit log is off, EngineUnavailableError while starting."""
    settings: Settings = request.app.state.settings
    if not settings.audit_enabled:
        raise NotFoundError("the audit log is disabled on this server (audit_enabled: false)")
    audit: AuditLog | None = getattr(request.app.state, "audit", None)
    if audit is None:
        raise EngineUnavailableError("the server is starting; retry shortly")
    return audit


AuditDep = Annotated[AuditLog, Depends(get_audit_log)]


@router.get("")
async def list_entries(
    _: Reader, audit: AuditDep, filters: Annotated[PageFilters, Query()]
) -> Json:
    # One entry more than asked tells whether another page follows.
    entries = await _read(audit, filters, after_seq=filters.after_seq, limit=filters.limit + 1)
    page = entries[: filters.limit]
    more = len(entries) > filters.limit
    return {
        "object": "list",
        "data": [entry.to_json() for entry in page],
        "next_after_seq": page[-1].seq if more else None,
    }


@router.get("/export")
async def export_entries(
    _: Reader, audit: AuditDep, filters: Annotated[ExportFilters, Query()]
) -> StreamingResponse:
    """JSON Lines, one Elastic Common Schema document per entry, oldest first."""
    return StreamingResponse(_ecs_lines(audit, filters), media_type="application/x-ndjson")


@router.post("/purge")
async def purge_entries(
    body: PurgeBody, principal: Purger, audit: AuditDep, request: Request
) -> Json:
    settings: Settings = request.app.state.settings
    before = as_utc(body.before)
    now = datetime.now(UTC)
    if before > now:
        raise InvalidRequestError("`before` is in the future", param="before")
    oldest_allowed = retention_cut(settings, now)
    if before > oldest_allowed and not settings.audit_retention_force:
        raise InvalidRequestError(
            f"entries are kept {settings.audit_retention_days} days (audit_retention_days): "
            f"`before` must be at or before {oldest_allowed.isoformat(timespec='seconds')}",
            param="before",
        )
    return {"purged": await audit.purge(before, actor=principal)}


async def _ecs_lines(audit: AuditLog, filters: ExportFilters) -> AsyncIterator[bytes]:
    """Page through the log (each page read off the event loop) and yield ECS lines."""
    after_seq, remaining = filters.after_seq, filters.limit
    while remaining is None or remaining > 0:
        page_size = EXPORT_PAGE if remaining is None else min(EXPORT_PAGE, remaining)
        entries = await _read(audit, filters, after_seq=after_seq, limit=page_size)
        if not entries:
            return
        yield b"".join(_json_line(to_ecs(entry)) for entry in entries)
        after_seq = entries[-1].seq
        if remaining is not None:
            remaining -= len(entries)
        if len(entries) < page_size:
            return


async def _read(
    audit: AuditLog, filters: _Filters, *, after_seq: int | None, limit: int
) -> list[AuditEntry]:
    return await asyncio.to_thread(
        query,
        audit.db,
        since=_as_utc_or_none(filters.since),
        until=_as_utc_or_none(filters.until),
        username=filters.user,
        model=filters.model,
        status=filters.status,
        action=filters.action,
        after_seq=after_seq,
        limit=limit,
    )


def as_utc(value: datetime) -> datetime:
    """Aware, in UTC (a time given without a zone is taken as UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _as_utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


def _json_line(document: Json) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
