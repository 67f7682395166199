"""The gateway's router: deployments by public model name, their replicas, health and weights.

Built from the settings at start (`app.state.router`), then changed at run time through the
admin API (`put`, `remove`: those deployments are stored, keys sealed). Specs are swapped whole
on a change, so a request sees one consistent spec; replicas that leave are drained. Used from
the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from aicc.auth.permissions import Permission
from aicc.auth.principal import Principal
from aicc.db import Database
from aicc.errors import (
    ConfigError,
    ConflictError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    QueueFullError,
)
from aicc.router import policy
from aicc.router.build import Replica as Replica
from aicc.router.build import build_replica, expand_ids, expanded, rollback_monitor
from aicc.router.canary import watch_canaries
from aicc.router.changes import check_changeable, check_shared_replicas
from aicc.router.health import HealthTracker, RollbackMonitor
from aicc.router.policy import DeploymentSpec, ReplicaLease, ReplicaSet, VariantSpec
from aicc.router.remote import RemoteClient
from aicc.router.replicas import Replicas, close_clients
from aicc.router.settings import DeploymentSettings, replica_id, replica_settings
from aicc.router.store import DeploymentStore
from aicc.router.views import deployment_view

if TYPE_CHECKING:
    from aicc.router.workers import WorkerReplica, WorkerSupervisor

logger = logging.getLogger(__name__)

VARIANT_HEADER = "x-aicc-variant"
TENANT_HEADER = "x-aicc-tenant"
"""The prefix-cache tenant our engine workers read (`worker_app.TENANT_HEADER`; not imported
from there: that module imports the API routes, which import this one)."""
WORKERS_VARIANT = "workers"
"""The one variant of the deployment that `aicc serve --workers N` makes of its model."""

AuditEvent = Callable[[str, Principal | None, dict[str, Any]], Awaitable[None]]
"""(action, principal, detail): writes an audit event."""
Source = Literal["config", "api", "workers"]
"""Where a deployment comes from; only `api` ones may be replaced or removed at run time."""


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
    source: Source = "config"


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
        secret: bytes | None = None,
        drain_timeout_s: float = 30.0,
        rng: policy.RandomSource | None = None,
    ) -> None:
        """`secret`: the server secret, which seals the keys of API-made deployments."""
        self.deployments = {d.spec.model: d for d in deployments}
        self.health = health
        self.fleet = Replicas(replicas, health, drain_timeout_s=drain_timeout_s)
        self.replicas = self.fleet.by_id
        self.outstanding = ReplicaSet(health)
        self.health_check_s = health_check_s
        self.retry_after_s = retry_after_s
        self.database = database
        self.store = DeploymentStore(database, secret) if database is not None else None
        self.audit_event: AuditEvent | None = None
        self.on_new_model: Callable[[str], None] | None = None
        """Called with each public name a change adds (the metrics' model label)."""
        self.is_served_here: Callable[[str], bool] = lambda _: False
        """Whether a name is a model this server serves itself (not a deployment name)."""
        self._rng = rng or random.Random()
        self._created = int(time.time())
        self._tasks: list[asyncio.Task[None]] = []
        self._down: set[str] = set()
        self._down_signals: dict[str, asyncio.Event] = {}
        """Supervised replicas down now (exited, restarting)."""
        self._changing = asyncio.Lock()

    @classmethod
    def from_settings(
        cls, deployments: list[DeploymentSettings], *, health_check_s: float, eject_s: float,
        retry_after_s: int, database: Database | None, secret: bytes | None = None,
        drain_timeout_s: float = 30.0,
    ) -> Router:  # fmt: skip
        """Raises `ConfigError` (an unreadable key or CA file, a missing key variable)."""
        replicas: dict[str, Replica] = {}
        built = []
        for settings in deployments:
            for rid, replica in replica_settings(settings):
                if rid not in replicas:
                    try:
                        replicas[rid] = build_replica(rid, settings.model, replica)
                    except InvalidRequestError as exc:
                        raise ConfigError(f"deployment {settings.model!r}: {exc.message}") from None
            fallback = tuple(replica_id(settings.model, r) for r in settings.fallback)
            monitor = rollback_monitor(settings)
            built.append(Deployment(settings.spec(), fallback, settings, monitor))
        health = HealthTracker(eject_s=eject_s, max_eject_s=max(eject_s, 300.0))
        return cls(
            built,
            replicas.values(),
            health=health,
            health_check_s=health_check_s,
            retry_after_s=retry_after_s,
            database=database,
            secret=secret,
            drain_timeout_s=drain_timeout_s,
        )

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the persisted weights and the API-made deployments, then start health checks
        and the rollback watch."""
        if self.store is not None:
            for model, weights in (await asyncio.to_thread(self.store.load_weights)).items():
                deployment = self.deployments.get(model)
                known = {v.name for v in deployment.spec.variants} if deployment else set()
                usable = {name: w for name, w in weights.items() if name in known}
                if deployment is not None and usable:
                    with contextlib.suppress(InvalidRequestError):  # all 0: keep the config's
                        deployment.spec = policy.set_weights(deployment.spec, usable)
            await self._load_stored(self.store)
        self._tasks.append(
            asyncio.create_task(self.fleet.watch(self.health_check_s), name="replica-health")
        )
        self._tasks.append(asyncio.create_task(watch_canaries(self), name="auto-rollback"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.fleet.close()

    # -- requests --------------------------------------------------------------------------
    def has(self, model: str | None) -> bool:
        return model is not None and model in self.deployments

    def remote_only_models(self) -> list[str]:
        """The deployments `is_remote_only` holds for."""
        return [model for model in self.deployments if self.is_remote_only(model)]

    def is_remote_only(self, model: str) -> bool:
        """Every replica the deployment can send a call to is reached over HTTP (another
        server or an engine worker), none is a model of this process."""
        deployment = self.deployments.get(model)
        if deployment is None:
            return False
        spec = deployment.spec
        groups = [variant.replicas for variant in spec.variants] + [deployment.fallback]
        for group in groups:
            for rid in group:
                replica = self.replicas.get(rid)
                if replica is not None and replica.client is None:
                    return False
        return True

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
                # A variant of a replaced deployment may name replicas that left.
                if rid in skipped or rid not in self.replicas or not self.is_in_service(rid):
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

    def serves_without_workers(self) -> bool:
        """Some deployment that routes to engine workers has another replica in service
        (a remote variant or fallback): with every worker down its model is still served."""
        supervised = self.fleet.supervised
        for deployment in self.deployments.values():
            ids = {rid for v in deployment.spec.variants for rid in v.replicas}
            ids.update(deployment.fallback)
            if ids & supervised and any(
                rid not in supervised and self.is_in_service(rid) for rid in ids
            ):
                return True
        return False

    def acquire(self, replica: Replica) -> ReplicaLease:
        """Count one request on the replica (and on its client, which a drain waits for)."""
        return self.fleet.acquire(self.outstanding, replica)

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
        deployment = self.deployments.get(model)  # None: removed while the request ran
        monitor = deployment.monitor if deployment is not None else None
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
            self.fleet.supervised.add(worker.id)
            self.set_in_service(worker.id, worker.is_ready)
            ids.append(worker.id)
        self.replicas.pop(local_id, None)
        self.fleet.workers = (local_id, tuple(ids))
        for deployment in self.deployments.values():
            deployment.spec = expanded(deployment.spec, local_id, ids)
            deployment.fallback = expand_ids(deployment.fallback, local_id, ids)
        if model not in self.deployments:
            spec = DeploymentSpec(model, (VariantSpec(WORKERS_VARIANT, 1.0, tuple(ids)),))
            self.deployments[model] = Deployment(spec, (), None, None, "workers")

        def on_change(worker: WorkerReplica) -> None:
            if worker.id in self.fleet.supervised:
                self.set_in_service(worker.id, worker.is_ready)

        return supervisor.on_change(on_change)

    def set_in_service(self, replica_id: str, is_in_service: bool) -> None:
        """What a supervisor reports: a replica is ready (its health starts afresh) or
        down (no request goes to it; those waiting for its answer hear of it through
        `down_signal`)."""
        if is_in_service:
            self._down.discard(replica_id)
            self.health.forget(replica_id)
            return
        self._down.add(replica_id)
        signal = self._down_signals.pop(replica_id, None)
        if signal is not None:
            signal.set()

    def down_signal(self, replica_id: str) -> asyncio.Event | None:
        """For an engine worker: an event set when it goes down (None for other replicas).
        A request sent to a worker just before it exited waits in its port's backlog (the
        supervisor holds the socket) for the restarted worker; this lets it give up and
        take another replica instead."""
        if replica_id not in self.fleet.supervised:
            return None
        signal = self._down_signals.get(replica_id)
        if signal is None:
            signal = self._down_signals[replica_id] = asyncio.Event()
        return signal

    # -- changes ---------------------------------------------------------------------------
    async def put(self, settings: DeploymentSettings, *, actor: str) -> tuple[dict[str, Any], bool]:
        """Create or replace an API-made deployment and store it. Returns its `describe` view
        and whether it was created. Replicas that stay keep their state; new ones get
        clients; those no longer used leave routing at once and are drained.

        Raises `DeploymentInConfigError`, `ModelServedHereError`, `ReplicaInUseError` (409),
        `InvalidRequestError` (a replica that cannot be built: bad URL, missing key variable,
        unreadable file)."""
        async with self._changing:
            model = settings.model
            check_changeable(self.deployments, model, self.is_served_here)
            check_shared_replicas(self.deployments, self.replicas, settings)
            built = await self._build(settings)
            try:
                if self.store is not None:
                    await asyncio.to_thread(self.store.save, settings, actor)
            except BaseException:
                await close_clients(r.client for r in built.values())
                raise
            is_created = model not in self.deployments
            self._install(settings, "api", built)
        logger.info("deployment %s %s by %s", model, "created" if is_created else "replaced", actor)
        return deployment_view(self, self.deployments[model]), is_created

    async def remove(self, model: str, *, actor: str) -> None:
        """Remove an API-made deployment; its replicas no other deployment uses are drained.
        Raises `ModelNotFoundError` (404), `DeploymentInConfigError` (409)."""
        async with self._changing:
            self._deployment(model)
            check_changeable(self.deployments, model, self.is_served_here)
            if self.store is not None:
                await asyncio.to_thread(self.store.delete, model)
            del self.deployments[model]
            self._drop_unused()
        logger.info("deployment %s removed by %s", model, actor)

    async def promote(self, model: str, variant: str, *, actor: str) -> DeploymentSpec:
        return await self._change(model, lambda d: policy.promote(d.spec, variant), actor)

    async def rollback(self, model: str, variant: str | None, *, actor: str) -> DeploymentSpec:
        """All traffic to `variant`; default the auto-rollback baseline, else the first."""

        def rolled_back(deployment: Deployment) -> DeploymentSpec:
            name = variant
            if name is None:
                rollback = deployment.settings.auto_rollback if deployment.settings else None
                name = rollback.baseline if rollback else deployment.spec.variants[0].name
            return policy.rollback(deployment.spec, name)

        return await self._change(model, rolled_back, actor)

    async def set_weights(
        self, model: str, weights: Mapping[str, float], *, actor: str
    ) -> DeploymentSpec:
        """Raises `InvalidRequestError` (unknown variant, bad weight, all 0)."""
        return await self._change(model, lambda d: policy.set_weights(d.spec, weights), actor)

    def describe(self) -> list[dict[str, Any]]:
        """Specs, weights, replica health and outstanding requests (the admin listing)."""
        return [deployment_view(self, deployment) for deployment in self.deployments.values()]

    # -- internals -------------------------------------------------------------------------
    def _deployment(self, model: str) -> Deployment:
        deployment = self.deployments.get(model)
        if deployment is None:
            raise ModelNotFoundError(f"no deployment {model!r}", param="model")
        return deployment

    def _install(
        self, settings: DeploymentSettings, source: Source, built: dict[str, Replica]
    ) -> None:
        spec, fallback = self.fleet.routing(settings)
        self.fleet.install(built)
        is_new = settings.model not in self.deployments
        monitor = rollback_monitor(settings)
        self.deployments[settings.model] = Deployment(spec, fallback, settings, monitor, source)
        self._drop_unused()
        if is_new and self.on_new_model is not None:
            self.on_new_model(settings.model)

    def _drop_unused(self) -> None:
        self.fleet.drop_unused(
            {
                rid
                for d in self.deployments.values()
                for rid in (*d.fallback, *(r for v in d.spec.variants for r in v.replicas))
            }
        )

    async def _build(self, settings: DeploymentSettings) -> dict[str, Replica]:
        """The new replicas `settings` needs (see `Replicas.build`)."""
        built: dict[str, Replica] = {}
        try:
            self.fleet.build(settings, built)
        except InvalidRequestError:
            await close_clients(r.client for r in built.values())
            raise
        return built

    async def _load_stored(self, store: DeploymentStore) -> None:
        """The API-made deployments, after the config's (whose names win)."""
        for stored in await asyncio.to_thread(store.load):
            try:
                if stored.settings is None:
                    raise InvalidRequestError(stored.problem or "unreadable settings")
                check_changeable(self.deployments, stored.model, self.is_served_here)
                check_shared_replicas(self.deployments, self.replicas, stored.settings)
                built = await self._build(stored.settings)
            except ConflictError as exc:
                logger.warning("stored deployment %s is skipped: %s", stored.model, exc.message)
            except InvalidRequestError as exc:
                logger.error("deployment %s is skipped: %s", stored.model, exc.message)
            else:
                self._install(stored.settings, "api", built)

    async def _change(
        self, model: str, change: Callable[[Deployment], DeploymentSpec], actor: str
    ) -> DeploymentSpec:
        async with self._changing:
            deployment = self._deployment(model)
            spec = change(deployment)
            weights = {variant.name: variant.weight for variant in spec.variants}
            if self.store is not None:
                save = (
                    self.store.save_api_weights
                    if deployment.source == "api"
                    else self.store.save_weights
                )
                await asyncio.to_thread(save, model, weights, actor)
            deployment.spec = spec  # one assignment: requests see old or new
        logger.info("deployment %s weights set to %s by %s", model, weights, actor)
        return spec
