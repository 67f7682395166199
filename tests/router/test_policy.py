"""Variant choice (weights, stickiness, overrides), weight changes and least-loaded replicas."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from aicc.errors import InvalidRequestError
from aicc.router.health import HealthTracker
from aicc.router.policy import (
    DeploymentSpec,
    ReplicaSet,
    ReplicaState,
    VariantSpec,
    choose_replica,
    choose_variant,
    promote,
    rollback,
    set_weights,
)


def deployment(*weights: float, sticky: str = "user") -> DeploymentSpec:
    variants = tuple(
        VariantSpec(f"v{i + 1}", weight, (f"r{i + 1}a", f"r{i + 1}b"))
        for i, weight in enumerate(weights)
    )
    return DeploymentSpec("deepseek-r1", variants, sticky=sticky)  # type: ignore[arg-type]


@pytest.mark.parametrize("weights", [(90.0, 10.0), (50.0, 50.0), (70.0, 20.0, 10.0)])
def test_sticky_keys_split_by_weight(weights: tuple[float, ...]) -> None:
    spec = deployment(*weights)
    rng = random.Random(0)
    counts = Counter(
        choose_variant(spec, sticky_key=f"user-{i}", override=None, rng=rng).name
        for i in range(4000)
    )
    for i, weight in enumerate(weights):
        share = counts[f"v{i + 1}"] / 4000
        assert share == pytest.approx(weight / sum(weights), abs=0.05), counts


def test_random_choice_splits_by_weight_and_skips_zero_weights() -> None:
    spec = deployment(90.0, 0.0, 10.0)
    rng = random.Random(1)
    counts = Counter(
        choose_variant(spec, sticky_key=None, override=None, rng=rng).name for _ in range(4000)
    )
    assert counts["v2"] == 0
    assert counts["v1"] / 4000 == pytest.approx(0.9, abs=0.05)


def test_a_sticky_key_keeps_its_variant_and_ignores_the_rng() -> None:
    spec = deployment(50.0, 50.0)
    first = {
        key: choose_variant(spec, sticky_key=key, override=None, rng=random.Random(1)).name
        for key in (f"k{i}" for i in range(1000))
    }
    again = {
        key: choose_variant(spec, sticky_key=key, override=None, rng=random.Random(2)).name
        for key in first
    }
    assert again == first
    assert set(first.values()) == {"v1", "v2"}
    # The hash covers the model too: another deployment splits the same keys differently.
    other = DeploymentSpec("other", spec.variants)
    moved = sum(
        choose_variant(other, sticky_key=key, override=None, rng=random.Random(0)).name != name
        for key, name in first.items()
    )
    assert 300 < moved < 700


def test_growing_a_canary_moves_only_keys_towards_it() -> None:
    spec = deployment(90.0, 10.0)
    grown = set_weights(spec, {"v1": 50.0, "v2": 50.0})
    rng = random.Random(0)
    for i in range(1000):
        key = f"user-{i}"
        before = choose_variant(spec, sticky_key=key, override=None, rng=rng).name
        after = choose_variant(grown, sticky_key=key, override=None, rng=rng).name
        assert not (before == "v2" and after == "v1")


def test_override_wins_even_at_weight_zero_and_must_exist() -> None:
    spec = deployment(100.0, 0.0)
    rng = random.Random(0)
    chosen = choose_variant(spec, sticky_key="user-1", override="v2", rng=rng)
    assert chosen.name == "v2"
    with pytest.raises(InvalidRequestError, match="no variant 'v9'"):
        choose_variant(spec, sticky_key=None, override="v9", rng=rng)


def test_promote_rollback_and_set_weights_make_new_specs() -> None:
    spec = deployment(90.0, 10.0)
    promoted = promote(spec, "v2")
    assert [v.weight for v in promoted.variants] == [0.0, 100.0]
    assert [v.weight for v in spec.variants] == [90.0, 10.0]  # the old spec is unchanged
    rng = random.Random(0)
    assert {
        choose_variant(promoted, sticky_key=str(i), override=None, rng=rng).name for i in range(200)
    } == {"v2"}
    back = rollback(promoted, "v1")
    assert [v.weight for v in back.variants] == [100.0, 0.0]
    assert back.variants[1].replicas == spec.variants[1].replicas
    assert [v.weight for v in set_weights(spec, {"v2": 30}).variants] == [90.0, 30.0]
    with pytest.raises(InvalidRequestError, match="no variant"):
        promote(spec, "v3")
    with pytest.raises(InvalidRequestError, match="no variant 'nope'"):
        set_weights(spec, {"nope": 1.0})
    with pytest.raises(InvalidRequestError, match="must not all be 0"):
        set_weights(spec, {"v1": 0.0, "v2": 0.0})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: VariantSpec("v1", -1.0, ("r",)), "weight must be a number ≥ 0"),
        (lambda: VariantSpec("v1", float("nan"), ("r",)), "weight must be a number ≥ 0"),
        (lambda: VariantSpec("v1", "10", ("r",)), "weight must be a number ≥ 0"),  # type: ignore[arg-type]
        (lambda: VariantSpec("v1", 1.0, ()), "at least one replica"),
        (lambda: VariantSpec("v1", 1.0, ("r", "r")), "lists a replica twice"),
        (lambda: VariantSpec("", 1.0, ("r",)), "needs a name"),
        (lambda: DeploymentSpec("m", ()), "at least one variant"),
        (
            lambda: DeploymentSpec("m", (VariantSpec("a", 1, ("r",)), VariantSpec("a", 1, ("s",)))),
            r"names a variant twice: \['a'\]",
        ),
        (lambda: DeploymentSpec("m", (VariantSpec("a", 0, ("r",)),)), "must not all be 0"),
        (
            lambda: DeploymentSpec("m", (VariantSpec("a", 1, ("r",)),), sticky="cookie"),  # type: ignore[arg-type]
            "sticky must be one of",
        ),
        (lambda: DeploymentSpec("", (VariantSpec("a", 1, ("r",)),)), "needs a model name"),
    ],
)
def test_invalid_specs_are_refused_with_a_clear_message(build: object, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        build()  # type: ignore[operator]


def test_least_outstanding_replica_with_round_robin_ties() -> None:
    states = [ReplicaState("a", 2), ReplicaState("b", 1), ReplicaState("c", 1)]
    assert choose_replica(states, turn=0) == "b"
    assert choose_replica(states, turn=1) == "c"
    assert choose_replica(states, exclude={"b"}) == "c"
    assert choose_replica([ReplicaState("a", 0, is_available=False), states[0]]) == "a"
    assert choose_replica(states, exclude={"a", "b", "c"}) is None


def test_replica_set_counts_leases_and_spreads_load() -> None:
    replicas = ReplicaSet()
    ids = ["a", "b", "c"]
    leases = [replicas.acquire(replicas.choose(ids) or "") for _ in range(6)]
    assert [replicas.num_outstanding(i) for i in ids] == [2, 2, 2]
    with replicas.acquire("a"):
        assert replicas.choose(ids) in ("b", "c")
    assert replicas.num_outstanding("a") == 2
    for lease in leases[:3]:
        lease.release()
        lease.release()  # twice counts once
    assert sum(replicas.num_outstanding(i) for i in ids) == 3
    with pytest.raises(ValueError, match="no outstanding request"):
        replicas.release("zzz")


def test_replica_set_skips_ejected_replicas() -> None:
    health = HealthTracker(eject_after=1, now=lambda: 0.0)
    replicas = ReplicaSet(health)
    health.record_failure("a")
    assert {replicas.choose(["a", "b"]) for _ in range(4)} == {"b"}
    health.record_failure("b")
    assert replicas.choose(["a", "b"]) is None
