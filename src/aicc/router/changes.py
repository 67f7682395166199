"""What the admin API may change: deployments it made, never the config's or the workers'."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from aicc.errors import ConflictError
from aicc.router.settings import DeploymentSettings, replica_settings

if TYPE_CHECKING:
    from aicc.router.build import Replica
    from aicc.router.service import Deployment


class DeploymentInConfigError(ConflictError):
    """The deployment comes from the config file (or is the workers' model): read-only here."""

    code = "deployment_in_config"


class ModelServedHereError(ConflictError):
    """The name is a model this server serves itself."""

    code = "model_served_here"


def check_changeable(
    deployments: Mapping[str, Deployment], model: str, is_served_here: Callable[[str], bool]
) -> None:
    """Whether the API may create, replace or remove deployment `model`. Raises
    `DeploymentInConfigError` (the config's or the workers'), `ModelServedHereError`."""
    existing = deployments.get(model)
    if existing is not None and existing.source == "workers":
        raise DeploymentInConfigError(
            f"{model!r} is the model of this server's engine workers; it cannot be "
            "changed through the API (choose another public name)",
            param="model",
        )
    if existing is not None and existing.source == "config":
        raise DeploymentInConfigError(
            f"deployment {model!r} comes from the config file and is read-only through the "
            "API; change it in the config file (promote, rollback and weights still work)",
            param="model",
        )
    if existing is None and is_served_here(model):
        raise ModelServedHereError(
            f"{model!r} is a model this server serves itself; choose another public name",
            param="model",
        )


class ReplicaInUseError(ConflictError):
    """A replica id another deployment uses with other settings (a key, timeouts)."""

    code = "replica_in_use"


def check_shared_replicas(
    deployments: Mapping[str, Deployment], replicas: Mapping[str, Replica], new: DeploymentSettings
) -> None:
    """A replica (`url#model`) is one client shared by every deployment naming it, so a
    deployment may name one that another deployment uses only with the same settings.
    Raises `ReplicaInUseError`."""
    for rid, settings in replica_settings(new):
        current = replicas.get(rid)
        if current is None or current.settings is None or current.settings == settings:
            continue
        for model, deployment in deployments.items():
            if model == new.model:
                continue
            ids = {*deployment.fallback, *(r for v in deployment.spec.variants for r in v.replicas)}
            if rid in ids:
                raise ReplicaInUseError(
                    f"replica {rid!r} is used by deployment {model!r} with other settings "
                    "(key, timeouts, limits); give it the same settings there and here",
                    param="replicas",
                )
