"""Building the router's parts from deployment settings: replicas (remote clients with their
keys), rollback monitors, and the expansion of the workers' `local:` replica."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aicc.errors import ConfigError
from aicc.router.health import RollbackMonitor
from aicc.router.policy import DeploymentSpec
from aicc.router.remote import RemoteClient, RemoteUpstream
from aicc.router.settings import DeploymentSettings, ReplicaSettings


@dataclass(frozen=True, slots=True)
class Replica:
    """Where one replica is: a model this gateway serves, or a remote client."""

    id: str
    max_inflight: int
    local_model: str | None = None
    """The pool's name of an in-process model."""
    client: RemoteClient | None = None
    upstream_model: str = ""
    """The `model` sent to a remote replica."""
    sets_tenant: bool = False
    """Send the caller's tenant (`x-aicc-tenant`): our own engine workers use it."""
    settings: ReplicaSettings | None = field(default=None, repr=False, compare=False)
    """What it was built from (None for engine workers): a change builds a new replica."""


def build_replica(rid: str, public_model: str, settings: ReplicaSettings) -> Replica:
    """Raises `InvalidRequestError` (a URL or timeout that cannot work) and `ConfigError` (an
    unreadable key or CA file, a missing key variable)."""
    if settings.local is not None:
        return Replica(rid, settings.max_inflight, local_model=settings.local, settings=settings)
    timeouts = settings.timeouts
    upstream = RemoteUpstream(
        settings.url or "",
        upstream_key(settings),
        connect_timeout_s=timeouts.connect_s,
        first_byte_timeout_s=timeouts.first_byte_s,
        idle_timeout_s=timeouts.idle_s,
        total_timeout_s=timeouts.total_s,
        check_timeout_s=timeouts.check_s,
        verify=str(settings.ca_file) if settings.ca_file else True,
    )
    return Replica(
        rid,
        settings.max_inflight,
        client=RemoteClient(upstream),
        upstream_model=settings.model or public_model,
        settings=settings,
    )


def upstream_key(settings: ReplicaSettings) -> str | None:
    """The upstream's key: literal (API-made), from its variable or file. Raises `ConfigError`."""
    if settings.api_key is not None:
        return settings.api_key.get_secret_value()
    if settings.api_key_env is not None:
        key = os.environ.get(settings.api_key_env, "").strip()
        if not key:
            raise ConfigError(
                f"the upstream key variable {settings.api_key_env} is not set (api_key_env)"
            )
        return key
    if settings.api_key_file is not None:
        path = Path(settings.api_key_file)
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read api_key_file {str(path)!r}: {exc.strerror}") from None
        if not key:
            raise ConfigError(f"api_key_file {str(path)!r} is empty")
        return key
    return None


def rollback_monitor(settings: DeploymentSettings) -> RollbackMonitor | None:
    """A fresh canary monitor for the deployment's `auto_rollback` (None without one)."""
    rollback = settings.auto_rollback
    if rollback is None:
        return None
    return RollbackMonitor(
        rollback.window_s,
        rollback.min_requests,
        rollback.max_error_rate_delta,
        rollback.max_p99_ratio,
    )


def expand_ids(ids: tuple[str, ...], old: str, new: Iterable[str]) -> tuple[str, ...]:
    """`ids` with `old` replaced by `new` (in its place, without duplicates)."""
    if old not in ids:
        return ids
    result: list[str] = []
    for rid in ids:
        for item in new if rid == old else (rid,):
            if item not in result:
                result.append(item)
    return tuple(result)


def expanded(spec: DeploymentSpec, old: str, new: Sequence[str]) -> DeploymentSpec:
    """`spec` with replica `old` replaced by `new` in every variant."""
    variants = tuple(
        dataclasses.replace(variant, replicas=expand_ids(variant.replicas, old, new))
        for variant in spec.variants
    )
    return dataclasses.replace(spec, variants=variants)
