"""`ModelPool`'s own decisions (single-flight loads, leases, eviction, registry changes), over
fake engines and a fake registry; `test_model_pool.py` runs the same paths on the real engine."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from aicc.api.models import LoadedModel, ModelPool, ModelsBusyError
from aicc.errors import ModelLoadError, ModelNotFoundError
from aicc.store.registry import ModelRecord

CREATED = datetime(2026, 1, 1, tzinfo=UTC)


def record(ref: str, sha256: str = "0" * 64) -> ModelRecord:
    name, tag = ref.split(":")
    return ModelRecord(
        name, tag, "test", ("m.gguf",), (sha256,), 1, None, None, None, None, None, False, None,
        CREATED, CREATED,
    )  # fmt: skip


@dataclass
class FakeRegistry:
    records: list[ModelRecord] = field(default_factory=list)
    version: int = 0

    def change_marker(self) -> tuple[int, int]:
        return len(self.records), self.version

    def list(self) -> list[ModelRecord]:
        return list(self.records)

    def set(self, *records: ModelRecord) -> None:
        self.records = list(records)
        self.version += 1


@dataclass
class FakeEngine:
    name: str
    num_shutdowns: int = 0

    @property
    def model_info(self) -> Any:
        return type("Info", (), {"max_context": 128})()

    async def shutdown(self) -> None:
        self.num_shutdowns += 1


@dataclass
class FakeServing:
    names: frozenset[str]

    def model_card(self) -> dict[str, Any]:
        return {"id": min(self.names), "object": "model", "created": 0, "owned_by": "aicc"}


def fake_model(name: str) -> LoadedModel:
    engine, serving = cast(Any, FakeEngine(name)), cast(Any, FakeServing(frozenset({name})))
    return LoadedModel(name, engine, serving, cast(Any, None))


@dataclass
class Loader:
    num_calls: int = 0
    num_failures: int = 0
    delay_s: float = 0.05
    loaded: list[LoadedModel] = field(default_factory=list)

    async def __call__(self, record: ModelRecord) -> LoadedModel:
        self.num_calls += 1
        await asyncio.sleep(self.delay_s)
        if self.num_failures:
            self.num_failures -= 1
            raise ModelLoadError(f"cannot load model {record.ref!r}")
        model = fake_model(record.ref)
        self.loaded.append(model)
        return model


def make_pool(registry: FakeRegistry, loader: Loader, max_loaded: int = 2) -> ModelPool:
    return ModelPool(
        fake_model("default"),
        registry=cast(Any, registry),
        load=loader,
        max_loaded=max_loaded,
        poll_s=3600,
        retry_after_s=3,
    )


def shutdowns(model: LoadedModel) -> int:
    return cast(FakeEngine, model.engine).num_shutdowns


def test_concurrent_first_requests_wait_for_one_load() -> None:
    async def scenario() -> None:
        loader = Loader()
        pool = make_pool(FakeRegistry([record("a:x")]), loader)
        await pool.refresh()
        models = await asyncio.gather(*(pool.acquire("a:x") for _ in range(5)))
        assert loader.num_calls == 1
        assert all(model is models[0] for model in models)
        assert await pool.acquire(None) is pool.default
        assert await pool.acquire("default") is pool.default
        assert [card["id"] for card in pool.cards()] == ["default", "a:x"]
        assert pool.card("a:x")["max_model_len"] == 128

    asyncio.run(scenario())


def test_a_model_in_use_is_never_evicted() -> None:
    async def scenario() -> None:
        loader = Loader()
        pool = make_pool(FakeRegistry([record("a:x"), record("b:x")]), loader)
        await pool.refresh()
        async with pool.lease("a:x") as a:
            with pytest.raises(ModelsBusyError) as caught:
                await pool.acquire("b:x")
            assert caught.value.retry_after_s == 3
            assert shutdowns(a) == 0
        b = await pool.acquire("b:x")
        assert shutdowns(a) == 1
        assert pool.loaded_names == ["default", "b:x"]
        assert b is not a

    asyncio.run(scenario())


def test_a_removed_model_is_unloaded_when_its_last_lease_ends() -> None:
    async def scenario() -> None:
        registry = FakeRegistry([record("a:x")])
        pool = make_pool(registry, Loader())
        await pool.refresh()
        async with pool.lease("a:x") as a:
            registry.set()
            await pool.refresh()
            with pytest.raises(ModelNotFoundError):
                await pool.acquire("a:x")
            assert "a:x" not in [card["id"] for card in pool.cards()]
            assert pool.loaded_names == ["default", "a:x"]
            assert shutdowns(a) == 0
        await asyncio.sleep(0)  # the unload runs as a task
        await asyncio.sleep(0)
        assert shutdowns(a) == 1
        assert pool.loaded_names == ["default"]

    asyncio.run(scenario())


def test_a_replaced_model_is_loaded_again() -> None:
    async def scenario() -> None:
        registry = FakeRegistry([record("a:x")])
        loader = Loader()
        pool = make_pool(registry, loader, max_loaded=3)
        await pool.refresh()
        old = await pool.acquire("a:x")
        registry.set(record("a:x", sha256="1" * 64))
        await pool.refresh()
        assert shutdowns(old) == 1  # idle: unloaded at once
        new = await pool.acquire("a:x")
        assert new is not old
        assert loader.num_calls == 2

    asyncio.run(scenario())


def test_a_failed_load_is_reported_to_every_waiter_and_tried_again_later() -> None:
    async def scenario() -> None:
        loader = Loader(num_failures=1)
        pool = make_pool(FakeRegistry([record("a:x")]), loader)
        await pool.refresh()
        results = await asyncio.gather(
            pool.acquire("a:x"), pool.acquire("a:x"), return_exceptions=True
        )
        assert all(isinstance(result, ModelLoadError) for result in results)
        assert (await pool.acquire("a:x")).name == "a:x"
        assert loader.num_calls == 2
        await pool.close()
        assert shutdowns(loader.loaded[0]) == 1

    asyncio.run(scenario())


@pytest.mark.parametrize("name", ["nope:x", "../etc", "", "a:x:y"])
def test_unknown_or_malformed_names_are_not_found(name: str) -> None:
    async def scenario() -> None:
        pool = make_pool(FakeRegistry([record("a:x")]), Loader())
        await pool.refresh()
        with pytest.raises(ModelNotFoundError, match="GET /v1/models lists"):
            await pool.acquire(name)
        with pytest.raises(ModelNotFoundError):
            pool.card(name)

    asyncio.run(scenario())
