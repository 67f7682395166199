"""User feedback per deployment variant, for A/B comparison.

`POST /v1/feedback` rates one of the caller's own earlier calls by its request id. The call is
looked up among the caller's `api.call` audit entries of the last `feedback_window_s` (by
username and time, both indexed, then request id; the newest if the id was reused), and its
model and variant are taken from that entry, never from the client. One rating per user and
call: a second one replaces the first. `GET /admin/deployments/{model}/feedback` sums the
current ratings per variant.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, cast

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator
from sqlalchemy import Select, Table, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from aicc.api.access import Reader
from aicc.api.admin.audit import get_audit_log
from aicc.api.record import call_record
from aicc.auth.deps import require
from aicc.auth.permissions import Permission
from aicc.auth.principal import Principal
from aicc.config import Settings
from aicc.db import Database
from aicc.db.models import AuditEntryRow, FeedbackRow, utcnow
from aicc.errors import NotFoundError
from aicc.observability.metrics import Metrics
from aicc.router.service import Router

router = APIRouter()

ConfigReader = Annotated[Principal, require(Permission.CONFIG_READ)]
Json = dict[str, Any]
_LOG = cast(Table, AuditEntryRow.__table__)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128)
    """The rated call's request id (its `x-request-id` response header)."""
    rating: StrictInt
    """1: good, -1: bad."""
    comment: str | None = Field(default=None, max_length=2000)

    @field_validator("rating")
    @classmethod
    def _is_up_or_down(cls, value: int) -> int:
        if value not in (1, -1):
            raise ValueError("rating must be 1 (good) or -1 (bad)")
        return value


class SummaryFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: datetime | None = None
    """Only ratings given (or last changed) at or after this time (no time zone means UTC)."""


@dataclass(frozen=True, slots=True)
class RatedCall:
    """What the audit log says about the call being rated."""

    model: str
    variant: str
    """The deployment variant that served it ("" when the call was not routed)."""


@dataclass(frozen=True, slots=True)
class VariantFeedback:
    variant: str
    num_positive: int = 0
    num_negative: int = 0

    @property
    def num_total(self) -> int:
        return self.num_positive + self.num_negative

    @property
    def positive_ratio(self) -> float | None:
        """Share of positive ratings (None without any rating)."""
        return self.num_positive / self.num_total if self.num_total else None

    def to_json(self) -> Json:
        return {
            "variant": self.variant,
            "positive": self.num_positive,
            "negative": self.num_negative,
            "total": self.num_total,
            "positive_ratio": self.positive_ratio,
        }


class FeedbackStore:
    """The `feedback` table and the audit-log lookup. Synchronous: use `asyncio.to_thread`."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def find_call(self, principal: Principal, request_id: str, since: datetime) -> RatedCall | None:
        """The caller's newest `api.call` with `request_id` that named a model, started at or
        after `since` (None if there is none)."""
        with self.database.engine.connect() as conn:
            rows = conn.execute(call_query(principal, request_id, since)).all()
        if not rows:
            return None
        _, model, detail = max(rows, key=lambda row: int(row[0]))
        variant = detail.get("variant") if isinstance(detail, dict) else None
        return RatedCall(str(model), variant if isinstance(variant, str) else "")

    def rate(
        self, user_id: int, request_id: str, call: RatedCall, rating: int, comment: str | None
    ) -> int | None:
        """Store the user's rating of the call, replacing theirs if any; the replaced rating.
        Two concurrent first ratings of one call: the later write wins."""
        try:
            with self.database.session() as session:
                return _upsert(session, user_id, request_id, call, rating, comment)
        except IntegrityError:  # the other one inserted first: now it is a replacement
            with self.database.session() as session:
                return _upsert(session, user_id, request_id, call, rating, comment)

    def summary(self, model: str, since: datetime | None) -> dict[str, VariantFeedback]:
        """Current ratings of calls to `model`, per variant."""
        statement = (
            select(FeedbackRow.variant, FeedbackRow.rating, func.count())
            .where(FeedbackRow.model == model)
            .group_by(FeedbackRow.variant, FeedbackRow.rating)
        )
        if since is not None:
            statement = statement.where(FeedbackRow.created_at >= since)
        counts: dict[str, dict[int, int]] = {}
        with self.database.session() as session:
            for variant, rating, count in session.execute(statement):
                counts.setdefault(variant, {})[rating] = count
        return {
            variant: VariantFeedback(variant, by_rating.get(1, 0), by_rating.get(-1, 0))
            for variant, by_rating in counts.items()
        }


def call_query(principal: Principal, request_id: str, since: datetime) -> Select[Any]:
    """The caller's `api.call` entries with `request_id` that named a model, since `since`.
    Starts from the username and time indexes (there is no request-id index: the audit insert
    path stays lean); no ORDER BY, which could make the database walk the log by seq."""
    return select(_LOG.c.seq, _LOG.c.model, _LOG.c.detail).where(
        _LOG.c.username == principal.username,
        _LOG.c.time >= since,
        _LOG.c.request_id == request_id,
        _LOG.c.action == "api.call",
        _LOG.c.user_id == principal.user_id,
        _LOG.c.model.is_not(None),
    )


def _upsert(
    session: Session,
    user_id: int,
    request_id: str,
    call: RatedCall,
    rating: int,
    comment: str | None,
) -> int | None:
    row = session.scalars(
        select(FeedbackRow).where(
            FeedbackRow.request_id == request_id, FeedbackRow.user_id == user_id
        )
    ).one_or_none()
    if row is None:
        session.add(
            FeedbackRow(
                request_id=request_id, user_id=user_id, model=call.model,
                variant=call.variant, rating=rating, comment=comment,
            )
        )  # fmt: skip
        return None
    previous = row.rating
    row.rating, row.comment, row.created_at = rating, comment, utcnow()
    return previous


def rating_label(rating: int) -> str:
    return "positive" if rating > 0 else "negative"


async def _store(request: Request) -> FeedbackStore:
    """Raises NotFoundError when the audit log is off (calls cannot be found then)."""
    return FeedbackStore((await get_audit_log(request)).db)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@router.post("/v1/feedback")
async def create_feedback(body: FeedbackRequest, principal: Reader, request: Request) -> Json:
    """Rate one of the caller's own calls (200 for a first rating and a replacement alike)."""
    store = await _store(request)
    record = call_record(request)
    if record is not None:  # the comment stays out of the audit log
        record.detail = {"request_id": body.request_id, "rating": body.rating}
    settings: Settings = request.app.state.settings
    since = datetime.now(UTC) - timedelta(seconds=settings.feedback_window_s)
    call = await asyncio.to_thread(store.find_call, principal, body.request_id, since)
    if call is None:
        raise NotFoundError(
            f"No call of yours with request id {body.request_id!r} in the last "
            f"{settings.feedback_window_s} seconds.",
            param="request_id",
        )
    args = (principal.user_id, body.request_id, call, body.rating, body.comment)
    previous = await asyncio.to_thread(store.rate, *args)
    metrics: Metrics | None = request.app.state.metrics
    if metrics is not None and previous != body.rating:
        metrics.observe_feedback(call.model, call.variant, rating_label(body.rating))
    if record is not None:
        record.detail = {**(record.detail or {}), "model": call.model, "variant": call.variant}
    return {
        "object": "feedback",
        "request_id": body.request_id,
        "model": call.model,
        "variant": call.variant,
        "rating": body.rating,
    }


@router.get("/admin/deployments/{model:path}/feedback")
async def feedback_summary(
    model: str, _: ConfigReader, request: Request, filters: Annotated[SummaryFilters, Query()]
) -> Json:
    """Current ratings per variant (a deployment's variants without any are listed at 0)."""
    since = _aware(filters.since) if filters.since is not None else None
    found = await asyncio.to_thread((await _store(request)).summary, model, since)
    deployments: Router | None = getattr(request.app.state, "router", None)
    if deployments is not None and deployments.has(model):
        for variant in deployments.deployments[model].spec.variants:
            found.setdefault(variant.name, VariantFeedback(variant.name))
    data = [found[name].to_json() for name in sorted(found)]
    return {"object": "list", "model": model, "data": data}
