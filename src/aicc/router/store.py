"""What the router keeps in the state database: API-made deployments and changed weights.

API-made deployments live in `deployments`, weights and all (one row each: the settings with
sealed keys). A config-file deployment's weight changes live in `deployment_weights` (its
settings stay in the file). Synchronous: the router calls it in a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import delete, select

from aicc.db import Database
from aicc.db.models import DeploymentRow, DeploymentWeightRow, utcnow
from aicc.router.keys import SealedKeyError, opened_settings, sealed_settings
from aicc.router.settings import DeploymentSettings

logger = logging.getLogger(__name__)

_MAX_ACTOR = 256


@dataclass(frozen=True, slots=True)
class StoredDeployment:
    """One row of `deployments`: its settings, or why they cannot be used."""

    model: str
    settings: DeploymentSettings | None
    problem: str | None = None


class DeploymentStore:
    def __init__(self, database: Database, secret: bytes | None) -> None:
        """`secret`: the server secret (sealing keys); None stores no API-made deployment."""
        self.database = database
        self._secret = secret

    # -- API-made deployments --------------------------------------------------------------
    def load(self) -> list[StoredDeployment]:
        """Every stored deployment, opened; one that does not open carries its `problem`."""
        with self.database.session() as session:
            rows = [(row.model, row.settings) for row in session.scalars(select(DeploymentRow))]
        stored = []
        for model, data in rows:
            if self._secret is None:
                stored.append(StoredDeployment(model, None, "the server secret is unknown"))
                continue
            try:
                stored.append(StoredDeployment(model, opened_settings(data, self._secret)))
            except SealedKeyError as exc:
                stored.append(StoredDeployment(model, None, exc.message))
        return stored

    def save(self, settings: DeploymentSettings, actor: str) -> bool:
        """Create or replace the row; True when it was created."""
        if self._secret is None:
            raise SealedKeyError("the server secret is unknown: deployments cannot be stored")
        data = sealed_settings(settings, self._secret)
        with self.database.session() as session:
            row = session.get(DeploymentRow, settings.model)
            created = row is None
            if row is None:
                row = DeploymentRow(model=settings.model, created_by=actor[:_MAX_ACTOR])
                session.add(row)
            row.settings = data
            row.updated_at = utcnow()
            row.updated_by = actor[:_MAX_ACTOR]
        return created

    def delete(self, model: str) -> None:
        with self.database.session() as session:
            session.execute(delete(DeploymentRow).where(DeploymentRow.model == model))

    def save_api_weights(self, model: str, weights: Mapping[str, float], actor: str) -> None:
        """New weights into an API-made deployment's stored settings."""
        with self.database.session() as session:
            row = session.get(DeploymentRow, model)
            if row is None:
                return  # removed meanwhile: nothing to keep
            data = dict(row.settings)
            data["variants"] = [
                {**variant, "weight": weights.get(variant.get("name"), variant.get("weight"))}
                for variant in data.get("variants") or []
            ]
            row.settings = data  # a new object: the JSON column sees the change
            row.updated_at = utcnow()
            row.updated_by = actor[:_MAX_ACTOR]

    # -- config-file deployments -----------------------------------------------------------
    def save_weights(self, model: str, weights: Mapping[str, float], actor: str) -> None:
        with self.database.session() as session:
            for variant, weight in weights.items():
                row = session.get(DeploymentWeightRow, (model, variant))
                if row is None:
                    row = DeploymentWeightRow(model=model, variant=variant, weight=weight)
                    session.add(row)
                row.weight = weight
                row.updated_at = utcnow()
                row.updated_by = actor[:_MAX_ACTOR]

    def load_weights(self) -> dict[str, dict[str, float]]:
        weights: dict[str, dict[str, float]] = {}
        with self.database.session() as session:
            for row in session.scalars(select(DeploymentWeightRow)):
                weights.setdefault(row.model, {})[row.variant] = row.weight
        return weights
