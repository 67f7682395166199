"""Traffic policy: a public model name → a deployment's variant (A/B, canary) → a replica.

Pure Python over plain data, no I/O: the randomness is passed in. Specs are immutable; a
weight change builds a new spec, which the caller swaps in atomically.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol, get_args

from aicc.errors import InvalidRequestError

if TYPE_CHECKING:
    from aicc.router.health import HealthTracker

Sticky = Literal["none", "user", "header"]
STICKY_MODES: tuple[str, ...] = get_args(Sticky)


class RandomSource(Protocol):
    """What routing needs from an RNG (`random.Random` fits)."""

    def random(self) -> float:
        """A float in [0, 1)."""
        ...


@dataclass(frozen=True, slots=True)
class VariantSpec:
    """One version of a deployment (`v1`, `canary`) and the replicas that serve it."""

    name: str
    weight: float
    """Share of traffic, relative to the other variants' weights; 0 takes only overrides."""
    replicas: tuple[str, ...]
    """Replica ids (a local engine or a remote upstream), in no particular order."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidRequestError("a variant needs a name", param="name")
        weight = self.weight
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise InvalidRequestError(
                f"variant {self.name!r}: weight must be a number ≥ 0, got {self.weight!r}",
                param="weight",
            )
        object.__setattr__(self, "replicas", tuple(self.replicas))
        if not self.replicas:
            raise InvalidRequestError(
                f"variant {self.name!r} needs at least one replica", param="replicas"
            )
        if any(not isinstance(r, str) or not r for r in self.replicas):
            raise InvalidRequestError(
                f"variant {self.name!r}: replica ids must not be empty", param="replicas"
            )
        if len(set(self.replicas)) != len(self.replicas):
            raise InvalidRequestError(
                f"variant {self.name!r} lists a replica twice: {list(self.replicas)}",
                param="replicas",
            )


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """A public model name and its weighted variants.

    Raises `InvalidRequestError` when invalid (a config loader wraps it as `ConfigError`).
    """

    model: str
    variants: tuple[VariantSpec, ...]
    sticky: Sticky = "none"
    """`user`: a caller keeps their variant; `header`: the `sticky_header` value decides."""
    sticky_header: str = "x-aicc-session"
    total_weight: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidRequestError("a deployment needs a model name", param="model")
        object.__setattr__(self, "variants", tuple(self.variants))
        if not self.variants:
            raise InvalidRequestError(
                f"deployment {self.model!r} needs at least one variant", param="variants"
            )
        names = [variant.name for variant in self.variants]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise InvalidRequestError(
                f"deployment {self.model!r} names a variant twice: {duplicates}",
                param="variants",
            )
        total = math.fsum(variant.weight for variant in self.variants)
        if not total > 0:
            raise InvalidRequestError(
                f"deployment {self.model!r}: the variant weights must not all be 0",
                param="weight",
            )
        if self.sticky not in STICKY_MODES:
            raise InvalidRequestError(
                f"deployment {self.model!r}: sticky must be one of {list(STICKY_MODES)}, "
                f"got {self.sticky!r}",
                param="sticky",
            )
        if self.sticky == "header" and not self.sticky_header.strip():
            raise InvalidRequestError(
                f"deployment {self.model!r}: sticky 'header' needs a header name",
                param="sticky_header",
            )
        object.__setattr__(self, "total_weight", total)

    def variant(self, name: str) -> VariantSpec:
        """The variant called `name`. Raises `InvalidRequestError` when there is none."""
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise InvalidRequestError(
            f"deployment {self.model!r} has no variant {name!r}; "
            f"it has {[v.name for v in self.variants]}",
            param="variant",
        )


def choose_variant(
    spec: DeploymentSpec,
    *,
    sticky_key: str | None,
    override: str | None,
    rng: RandomSource,
) -> VariantSpec:
    """The variant for one request.

    An `override` (a tester's variant name) wins, even for a variant at weight 0. A
    `sticky_key` maps a stable hash of (model, key) onto the cumulative weights, so a key keeps
    its variant while the weights stay, and many keys split as the weights do. Otherwise the
    choice is weighted random. Raises `InvalidRequestError` for an unknown override.
    """
    if override is not None:
        return spec.variant(override)
    point = _stable_unit(spec.model, sticky_key) if sticky_key is not None else rng.random()
    return _at_point(spec, point * spec.total_weight)


def _stable_unit(model: str, key: str) -> float:
    """A float in [0, 1) that depends only on (model, key), the same in every process."""
    digest = hashlib.blake2b(f"{model}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _at_point(spec: DeploymentSpec, point: float) -> VariantSpec:
    cumulative = 0.0
    chosen = None
    for variant in spec.variants:
        if variant.weight <= 0:
            continue
        chosen = variant
        cumulative += variant.weight
        if point < cumulative:
            return variant
    assert chosen is not None  # total_weight > 0: some variant has weight
    return chosen  # rounding put the point at the very end


def set_weights(spec: DeploymentSpec, weights: Mapping[str, float]) -> DeploymentSpec:
    """A copy with these variants' weights changed (others keep theirs).

    Raises `InvalidRequestError` for an unknown variant or weights that leave no traffic.
    """
    unknown = sorted(set(weights) - {variant.name for variant in spec.variants})
    if unknown:
        raise InvalidRequestError(
            f"deployment {spec.model!r} has no variant {unknown[0]!r}", param="variant"
        )
    variants = tuple(
        replace(variant, weight=float(weights.get(variant.name, variant.weight)))
        for variant in spec.variants
    )
    return replace(spec, variants=variants)


def promote(spec: DeploymentSpec, variant: str) -> DeploymentSpec:
    """A copy that sends all traffic to `variant` (the others go to weight 0)."""
    spec.variant(variant)
    return set_weights(spec, {v.name: 100.0 if v.name == variant else 0.0 for v in spec.variants})


def rollback(spec: DeploymentSpec, baseline: str) -> DeploymentSpec:
    """A copy that sends all traffic back to `baseline`."""
    return promote(spec, baseline)


@dataclass(frozen=True, slots=True)
class ReplicaState:
    replica_id: str
    num_outstanding: int
    """Requests sent to the replica and not finished yet."""
    is_available: bool = True


def choose_replica(
    states: Sequence[ReplicaState], *, exclude: Iterable[str] = (), turn: int = 0
) -> str | None:
    """The available replica with the fewest outstanding requests, skipping `exclude` (e.g.
    the replica a retry left). Ties go round-robin by `turn`. None when none is available."""
    skipped = set(exclude)
    candidates = [s for s in states if s.is_available and s.replica_id not in skipped]
    if not candidates:
        return None
    least = min(state.num_outstanding for state in candidates)
    tied = [state for state in candidates if state.num_outstanding == least]
    return tied[turn % len(tied)].replica_id


class ReplicaSet:
    """Counts outstanding requests per replica and picks the least loaded one.

    Used from the event loop only (not thread-safe).
    """

    def __init__(self, health: HealthTracker | None = None) -> None:
        self.health = health
        self._outstanding: dict[str, int] = {}
        self._turn = 0

    def num_outstanding(self, replica_id: str) -> int:
        return self._outstanding.get(replica_id, 0)

    def states(self, replica_ids: Iterable[str]) -> list[ReplicaState]:
        health = self.health
        return [
            ReplicaState(
                replica_id,
                self.num_outstanding(replica_id),
                health is None or health.is_available(replica_id),
            )
            for replica_id in replica_ids
        ]

    def choose(self, replica_ids: Iterable[str], *, exclude: Iterable[str] = ()) -> str | None:
        """The least loaded available replica of `replica_ids` (see `choose_replica`)."""
        chosen = choose_replica(self.states(replica_ids), exclude=exclude, turn=self._turn)
        self._turn += 1
        return chosen

    def acquire(self, replica_id: str) -> ReplicaLease:
        """Count one more request on `replica_id` until the lease is released (or its `with`
        block ends)."""
        self._outstanding[replica_id] = self.num_outstanding(replica_id) + 1
        return ReplicaLease(self, replica_id)

    def release(self, replica_id: str) -> None:
        """Count one request less. Raises `ValueError` when none is outstanding."""
        count = self.num_outstanding(replica_id)
        if count <= 0:
            raise ValueError(f"replica {replica_id!r} has no outstanding request to release")
        if count == 1:
            del self._outstanding[replica_id]
        else:
            self._outstanding[replica_id] = count - 1


class ReplicaLease:
    """One outstanding request on a replica; releasing it twice counts once."""

    __slots__ = ("_is_released", "_replicas", "replica_id")

    def __init__(self, replicas: ReplicaSet, replica_id: str) -> None:
        self._replicas = replicas
        self.replica_id = replica_id
        self._is_released = False

    def release(self) -> None:
        if not self._is_released:
            self._is_released = True
            self._replicas.release(self.replica_id)

    def __enter__(self) -> ReplicaLease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
