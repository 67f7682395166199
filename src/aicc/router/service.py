"""The gateway's router: deployments by public model name, their replicas, health and weights.

Built from the settings at start (`app.state.router`). Specs are swapped whole on a weight
change, so a request sees one consistent spec. Used from the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import select

from aicc.auth.permissions import Permission
from aicc.auth.principal import Principal
from aicc.db import Database
from aicc.db.models import DeploymentWeightRow, utcnow
from aicc.errors import (
    ConfigError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    QueueFullError,
)
from aicc.router import policy
from aicc.router.health import HealthTracker, RollbackMonitor
from aicc.router.policy import DeploymentSpec, ReplicaLease, ReplicaSet, VariantSpec
from aicc.router.remote import RemoteClient, RemoteUpstream
from aicc.router.settings import DeploymentSettings, ReplicaSettings, replica_id

if TYPE_CHECKING:
    from fastapi import FastAPI

    from aicc.config import Settings
    from aicc.router.workers import WorkerReplica, WorkerSupervisor

logger = logging.getLogger(__name__)

VARIANT_HEADER = "x-aicc-variant"
TENANT_HEADER = "x-aicc-tenant"
"""The prefix-cache tenant our engine workers read (`worker_app.TENANT_HEADER`; not imported
from there: that module imports the API routes, which import this one)."""
WORKERS_VARIANT = "workers"
"""The one variant of the deployment that `aicc serve --workers N` makes of its model."""
ROLLBACK_EVERY_S = 2.0
AUTO_ROLLBACK_ACTOR = "auto-rollback"

AuditEvent = Callable[[str, Principal | None, dict[str, Any]], Awaitable[None]]
"""(action, principal, detail): writes an audit event."""


class ReplicasBusyError(QueueFullError):
    """Every replica that could serve the request is at its `max_inflight`."""

    code = "replicas_busy"


class NoReplicaError(EngineUnavailableError):
    """No replica of the deployment is in service (all ejected or down)."""

    code = "no_replica_available"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


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


@dataclass(frozen=True, slots=True)
class RouteDecision:
    model: str
    variant: str
    replica: Replica


@dataclass(slots=True)
class Deployment:
    spec: DeploymentSpec
    fallback: tuple[str, ...]
    settings: DeploymentSettings | None
    monitor: RollbackMonitor | None


class Router:
    """Public model name → variant → replica; counts outstanding requests and health."""

    def __init__(
        self,
        deployments: Iterable[Deployment],
        replicas: Iterable[Replica],
        *,
        health: HealthTracker,
        health_check_s: float,
        retry_after_s: int = 1,
        database: Database | None = None,
        rng: policy.RandomSource | None = None,
    ) -> None:
        self.deployments = {d.spec.model: d for d in deployments}
        self.replicas = {replica.id: replica for replica in replicas}
        self.health = health
        self.outstanding = ReplicaSet(health)
        self.health_check_s = health_check_s
        self.retry_after_s = retry_after_s
        self.database = database
        self.audit_event: AuditEvent | None = None
        self._rng = rng or random.Random()
        self._created = int(time.time())
        self._tasks: list[asyncio.Task[None]] = []
        self._http: httpx.AsyncClient | None = None
        self._supervised: set[str] = set()
        """Replicas whose state their supervisor reports (engine workers): no active checks."""
        self._down: set[str] = set()
        """Supervised replicas down now (exited, restarting)."""

    @classmethod
    def from_settings(
        cls, deployments: list[DeploymentSettings], *, health_check_s: float, eject_s: float,
        retry_after_s: int, database: Database | None,
    ) -> Router:  # fmt: skip
        """Raises `ConfigError` (an unreadable key or CA file, a missing key variable)."""
        replicas: dict[str, Replica] = {}
        built = []
        for settings in deployments:
            for replica in [r for v in settings.variants for r in v.replicas] + settings.fallback:
                rid = replica_id(settings.model, replica)
                replicas.setdefault(rid, _replica(rid, settings.model, replica))
            fallback = tuple(replica_id(settings.model, r) for r in settings.fallback)
            rollback = settings.auto_rollback
            monitor = None
            if rollback is not None:
                monitor = RollbackMonitor(
                    rollback.window_s,
                    rollback.min_requests,
                    rollback.max_error_rate_delta,
                    rollback.max_p99_ratio,
                )
            built.append(Deployment(settings.spec(), fallback, settings, monitor))
        health = HealthTracker(eject_s=eject_s, max_eject_s=max(eject_s, 300.0))
        return cls(
            built,
            replicas.values(),
            health=health,
            health_check_s=health_check_s,
            retry_after_s=retry_after_s,
            database=database,
        )

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the persisted weights, then start health checks and the rollback watch."""
        if self.database is not None:
            for model, weights in (await asyncio.to_thread(self._load_weights)).items():
                deployment = self.deployments.get(model)
                known = {v.name for v in deployment.spec.variants} if deployment else set()
                usable = {name: w for name, w in weights.items() if name in known}
                if deployment is not None and usable:
                    with contextlib.suppress(InvalidRequestError):  # all 0: keep the config's
                        deployment.spec = policy.set_weights(deployment.spec, usable)
        self._tasks.append(asyncio.create_task(self._check_health(), name="replica-health"))
        if any(d.monitor is not None for d in self.deployments.values()):
            self._tasks.append(asyncio.create_task(self._watch_canaries(), name="auto-rollback"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for replica in self.replicas.values():
            if replica.client is not None:
                await replica.client.aclose()

    # -- requests --------------------------------------------------------------------------
    def has(self, model: str | None) -> bool:
        return model is not None and model in self.deployments

    @property
    def names(self) -> list[str]:
        return list(self.deployments)

    def cards(self) -> list[dict[str, Any]]:
        """The deployments as `GET /v1/models` lists them."""
        return [self.card(name) for name in self.deployments]

    def card(self, model: str) -> dict[str, Any]:
        self._deployment(model)
        return {"id": model, "object": "model", "created": self._created, "owned_by": "aicc"}

    def choose_variant(
        self, model: str, principal: Principal, headers: Mapping[str, str]
    ) -> VariantSpec:
        """The variant for one request. Raises `PermissionDeniedError` for an override
        without `inference:variant`, `InvalidRequestError` for an unknown one."""
        spec = self._deployment(model).spec
        override = headers.get(VARIANT_HEADER)
        if override is not None and not principal.can(Permission.VARIANT_SELECT):
            raise PermissionDeniedError(
                f"the {VARIANT_HEADER} header needs the {Permission.VARIANT_SELECT.value} "
                "permission; send the request without it",
                param=VARIANT_HEADER,
            )
        sticky_key: str | None = None
        if spec.sticky == "user":
            sticky_key = str(principal.user_id)
        elif spec.sticky == "header":
            sticky_key = headers.get(spec.sticky_header)
        return policy.choose_variant(spec, sticky_key=sticky_key, override=override, rng=self._rng)

    def choose_replica(
        self, model: str, variant: VariantSpec, *, exclude: Iterable[str] = ()
    ) -> Replica:
        """The least loaded replica of `variant` in service and below its `max_inflight`,
        else of the deployment's fallback. Raises `ReplicasBusyError` (429: all full) or
        `NoReplicaError` (503: none in service)."""
        skipped = set(exclude)
        is_full = False
        for group in (variant.replicas, self._deployment(model).fallback):
            candidates = []
            for rid in group:
                if rid in skipped or not self.is_in_service(rid):
                    continue
                if self.outstanding.num_outstanding(rid) >= self.replicas[rid].max_inflight:
                    is_full = True
                    continue
                candidates.append(rid)
            chosen = self.outstanding.choose(candidates)
            if chosen is not None:
                return self.replicas[chosen]
        if is_full:
            raise ReplicasBusyError(
                f"every replica of {model!r} is busy; retry shortly",
                retry_after_s=self.retry_after_s,
            )
        raise NoReplicaError(
            f"no replica of {model!r} is available; retry shortly",
            retry_after_s=self.retry_after_s,
        )

    def is_in_service(self, replica_id: str) -> bool:
        """Neither down (supervised replicas) nor ejected."""
        return replica_id not in self._down and self.health.is_available(replica_id)

    def acquire(self, replica: Replica) -> ReplicaLease:
        return self.outstanding.acquire(replica.id)

    def record(
        self, decision: RouteDecision, *, ok: bool, latency_s: float, replica_failed: bool = False
    ) -> None:
        """One request's outcome: its replica's health (failures only when the replica is
        to blame) and the canary comparison."""
        if replica_failed:
            if self.health.record_failure(decision.replica.id):
                logger.warning("replica %s ejected after failures", decision.replica.id)
        elif ok:
            self.health.record_success(decision.replica.id)
        self.observe_variant(decision.model, decision.variant, ok=ok, latency_s=latency_s)

    def observe_variant(self, model: str, variant: str, *, ok: bool, latency_s: float) -> None:
        """One request's outcome for the canary comparison (also one no replica could take)."""
        monitor = self._deployment(model).monitor
        if monitor is not None:
            monitor.observe(variant, ok, latency_s)

    # -- engine workers --------------------------------------------------------------------
    def serve_workers(self, model: str, supervisor: WorkerSupervisor) -> Callable[[], None]:
        """Serve `model` by the supervisor's workers. A configured deployment's `local`
        replica naming `model` stands for all the workers, so workers, remote replicas and
        fallbacks mix in one deployment; without a deployment named `model` one is made with
        one variant, `workers`. A worker leaves service as soon as it exits and returns, its
        ejections forgotten, once it is ready again. Returns the function that stops
        following them.

        Raises `ConfigError` for an in-process replica of another model (workers mode loads
        no model in the gateway).
        """
        local_id = f"local:{model}"
        other = sorted(
            rid for rid, r in self.replicas.items() if r.local_model is not None and rid != local_id
        )
        if other:
            raise ConfigError(
                f"replica {other[0]!r}: with workers > 0 the gateway loads no model "
                f"in-process; name the workers' model ({local_id!r}), use a url replica, "
                "or set workers: 0"
            )
        settings = supervisor.settings
        max_inflight = settings.max_batch_size + settings.max_queue
        ids: list[str] = []
        for worker in supervisor.replicas():
            client = RemoteClient(supervisor.upstream(worker.id))
            self.replicas[worker.id] = Replica(
                worker.id, max_inflight, client=client, upstream_model=model, sets_tenant=True
            )
            self._supervised.add(worker.id)
            self.set_in_service(worker.id, worker.is_ready)
            ids.append(worker.id)
        self.replicas.pop(local_id, None)
        for deployment in self.deployments.values():
            deployment.spec = _expanded(deployment.spec, local_id, ids)
            deployment.fallback = _expand_ids(deployment.fallback, local_id, ids)
        if model not in self.deployments:
            spec = DeploymentSpec(model, (VariantSpec(WORKERS_VARIANT, 1.0, tuple(ids)),))
            self.deployments[model] = Deployment(spec, (), None, None)

        def on_change(worker: WorkerReplica) -> None:
            if worker.id in self._supervised:
                self.set_in_service(worker.id, worker.is_ready)

        return supervisor.on_change(on_change)

    def set_in_service(self, replica_id: str, is_in_service: bool) -> None:
        """What a supervisor reports: a replica is ready (its health starts afresh) or
        down (no request goes to it)."""
        if is_in_service:
            self._down.discard(replica_id)
            self.health.forget(replica_id)
        else:
            self._down.add(replica_id)

    # -- changes ---------------------------------------------------------------------------
    async def promote(self, model: str, variant: str, *, actor: str) -> DeploymentSpec:
        spec = self._deployment(model).spec
        return await self._change(model, policy.promote(spec, variant), actor)

    async def rollback(self, model: str, variant: str | None, *, actor: str) -> DeploymentSpec:
        """All traffic to `variant`; default the auto-rollback baseline, else the first."""
        deployment = self._deployment(model)
        if variant is None:
            rollback = deployment.settings.auto_rollback if deployment.settings else None
            variant = rollback.baseline if rollback else deployment.spec.variants[0].name
        return await self._change(model, policy.rollback(deployment.spec, variant), actor)

    async def set_weights(
        self, model: str, weights: Mapping[str, float], *, actor: str
    ) -> DeploymentSpec:
        """Raises `InvalidRequestError` (unknown variant, bad weight, all 0)."""
        spec = self._deployment(model).spec
        return await self._change(model, policy.set_weights(spec, weights), actor)

    def describe(self) -> list[dict[str, Any]]:
        """Specs, weights, replica health and outstanding requests (the admin listing)."""
        return [self._describe(deployment) for deployment in self.deployments.values()]

    # -- internals -------------------------------------------------------------------------
    def _deployment(self, model: str) -> Deployment:
        deployment = self.deployments.get(model)
        if deployment is None:
            raise ModelNotFoundError(f"no deployment {model!r}", param="model")
        return deployment

    async def _change(self, model: str, spec: DeploymentSpec, actor: str) -> DeploymentSpec:
        weights = {variant.name: variant.weight for variant in spec.variants}
        if self.database is not None:
            await asyncio.to_thread(self._save_weights, model, weights, actor)
        self._deployment(model).spec = spec  # one assignment: requests see old or new
        logger.info("deployment %s weights set to %s by %s", model, weights, actor)
        return spec

    def _save_weights(self, model: str, weights: Mapping[str, float], actor: str) -> None:
        assert self.database is not None
        with self.database.session() as session:
            for variant, weight in weights.items():
                row = session.get(DeploymentWeightRow, (model, variant))
                if row is None:
                    row = DeploymentWeightRow(model=model, variant=variant, weight=weight)
                    session.add(row)
                row.weight = weight
                row.updated_at = utcnow()
                row.updated_by = actor[:256]

    def _load_weights(self) -> dict[str, dict[str, float]]:
        assert self.database is not None
        weights: dict[str, dict[str, float]] = {}
        with self.database.session() as session:
            for row in session.scalars(select(DeploymentWeightRow)):
                weights.setdefault(row.model, {})[row.variant] = row.weight
        return weights

    async def _check_health(self) -> None:
        remote = [
            replica
            for replica in self.replicas.values()
            if replica.client is not None and replica.id not in self._supervised
        ]
        while True:
            await asyncio.sleep(self.health_check_s)
            results = await asyncio.gather(*(r.client.health() for r in remote if r.client))
            for replica, ok in zip(remote, results, strict=True):
                if self.health.record_check(replica.id, ok):
                    logger.info("replica %s is back in service", replica.id)

    async def _watch_canaries(self) -> None:
        while True:
            await asyncio.sleep(ROLLBACK_EVERY_S)
            for model, deployment in self.deployments.items():
                await self._judge(model, deployment)

    async def _judge(self, model: str, deployment: Deployment) -> None:
        settings = deployment.settings.auto_rollback if deployment.settings else None
        if settings is None or deployment.monitor is None:
            return
        if deployment.spec.variant(settings.canary).weight <= 0:
            return  # nothing to roll back
        reason = deployment.monitor.verdict(settings.canary, settings.baseline)
        if reason is None:
            return
        logger.warning("rolling %s back to %s: %s", model, settings.baseline, reason)
        await self.rollback(model, settings.baseline, actor=AUTO_ROLLBACK_ACTOR)
        deployment.monitor = RollbackMonitor(
            settings.window_s, settings.min_requests, settings.max_error_rate_delta,
            settings.max_p99_ratio,
        )  # fmt: skip
        if self.audit_event is not None:
            detail = {"model": model, "variant": settings.baseline, "canary": settings.canary,
                      "reason": reason}  # fmt: skip
            try:
                await self.audit_event("deploy.rollback", None, detail)
            except Exception:  # the rollback stands; a lost entry must be seen in the log
                logger.exception("the audit entry of the rollback of %s was not written", model)

    def _describe(self, deployment: Deployment) -> dict[str, Any]:
        spec = deployment.spec

        def replica_view(rid: str) -> dict[str, Any]:
            status = self.health.status(rid)
            replica = self.replicas[rid]
            kind = "worker" if rid in self._supervised else "remote"
            return {
                "id": rid,
                "kind": "local" if replica.local_model is not None else kind,
                "available": self.is_in_service(rid),
                "consecutive_failures": status.num_consecutive_failures,
                "ejections": status.num_ejections,
                "outstanding": self.outstanding.num_outstanding(rid),
                "max_inflight": replica.max_inflight,
            }

        return {
            "model": spec.model,
            "sticky": spec.sticky,
            "variants": [
                {
                    "name": v.name,
                    "weight": v.weight,
                    "replicas": [replica_view(r) for r in v.replicas],
                }
                for v in spec.variants
            ],
            "fallback": [replica_view(rid) for rid in deployment.fallback],
            "auto_rollback": (
                deployment.settings.auto_rollback.model_dump()
                if deployment.settings and deployment.settings.auto_rollback
                else None
            ),
        }


def _expand_ids(ids: tuple[str, ...], old: str, new: Iterable[str]) -> tuple[str, ...]:
    """`ids` with `old` replaced by `new` (in its place, without duplicates)."""
    if old not in ids:
        return ids
    result: list[str] = []
    for rid in ids:
        for item in new if rid == old else (rid,):
            if item not in result:
                result.append(item)
    return tuple(result)


def _expanded(spec: DeploymentSpec, old: str, new: Sequence[str]) -> DeploymentSpec:
    variants = tuple(
        dataclasses.replace(variant, replicas=_expand_ids(variant.replicas, old, new))
        for variant in spec.variants
    )
    return dataclasses.replace(spec, variants=variants)


def _replica(rid: str, public_model: str, settings: ReplicaSettings) -> Replica:
    if settings.local is not None:
        return Replica(rid, settings.max_inflight, local_model=settings.local)
    timeouts = settings.timeouts
    try:
        upstream = RemoteUpstream(
            settings.url or "",
            _api_key(settings),
            connect_timeout_s=timeouts.connect_s,
            first_byte_timeout_s=timeouts.first_byte_s,
            idle_timeout_s=timeouts.idle_s,
            total_timeout_s=timeouts.total_s,
            check_timeout_s=timeouts.check_s,
            verify=str(settings.ca_file) if settings.ca_file else True,
        )
    except InvalidRequestError as exc:
        raise ConfigError(f"deployment {public_model!r}: {exc.message}") from None
    return Replica(
        rid,
        settings.max_inflight,
        client=RemoteClient(upstream),
        upstream_model=settings.model or public_model,
    )


def _api_key(settings: ReplicaSettings) -> str | None:
    """The upstream's key from its variable or file. Raises `ConfigError`."""
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


@contextlib.asynccontextmanager
async def running_router(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """`app.state.router` while the app runs (None without deployments)."""
    app.state.router = None
    workers: WorkerSupervisor | None = getattr(app.state, "workers", None)
    if not settings.deployments and workers is None:
        yield
        return
    registry = getattr(app.state, "registry", None)
    router = Router.from_settings(
        settings.deployments,
        health_check_s=settings.health_check_s,
        eject_s=settings.replica_eject_s,
        retry_after_s=settings.retry_after_s,
        database=registry.database if registry is not None else None,
    )
    unsubscribe: Callable[[], None] | None = None
    if workers is not None:
        name = settings.served_model_name or workers.model_spec.name
        try:
            unsubscribe = router.serve_workers(name, workers)
        except ConfigError as exc:
            await router.close()
            app.state.startup_error = exc
            raise
    audit = getattr(app.state, "audit", None)
    if audit is not None:

        async def audit_event(action: str, who: Principal | None, detail: dict[str, Any]) -> None:
            await audit.append_event(action=action, principal=who, detail=detail)

        router.audit_event = audit_event
    metrics = getattr(app.state, "metrics", None)
    if metrics is not None:
        for name in router.names:
            metrics.add_model_label(name)
    await router.start()
    app.state.router = router
    try:
        yield
    finally:
        app.state.router = None
        if unsubscribe is not None:
            unsubscribe()
        await router.close()
