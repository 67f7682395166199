"""The models a server serves: the configured one, loaded at start and kept, and registered
models loaded on their first request and unloaded when least recently used or removed.

Every request holds a lease on its model from the dependency that picks it until the response
has been sent; a model is unloaded only while no lease is held. A poller follows the registry
(`ModelRegistry.change_marker`) and keeps the cached model list that `GET /v1/models` serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aicc.api.openai.chat import ChatServing
from aicc.api.openai.serving import OpenAIServing
from aicc.engine.interface import EngineClient
from aicc.errors import EngineUnavailableError, InvalidRequestError, ModelNotFoundError
from aicc.observability.metrics import Metrics
from aicc.store.names import DEFAULT_TAG, format_ref, parse_ref
from aicc.store.registry import ModelRecord, ModelRegistry

logger = logging.getLogger(__name__)

Json = dict[str, Any]
_MAX_ACQUIRE_TRIES = 3


class ModelsBusyError(EngineUnavailableError):
    """No model can be unloaded to make room for another: every loaded one is in use."""

    code = "models_busy"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(slots=True, eq=False)
class LoadedModel:
    """One model in memory and the services routes use with it."""

    name: str
    engine: EngineClient
    serving: OpenAIServing
    chat: ChatServing
    num_leases: int = 0
    """Requests using it now (from the route's dependency until the response is sent)."""
    last_used: float = field(default_factory=time.monotonic)
    is_unloaded: bool = False


def aliases_of(ref: str) -> frozenset[str]:
    """Other names a request may use for `ref`: `name` for `name:latest`."""
    name, _, tag = ref.partition(":")
    return frozenset({name}) if tag == DEFAULT_TAG else frozenset()


ModelLoader = Callable[[ModelRecord], Awaitable[LoadedModel]]


class ModelPool:
    """Loaded models by name, the registry's models that may be loaded, and their cards."""

    def __init__(
        self,
        default: LoadedModel,
        *,
        registry: ModelRegistry | None,
        load: ModelLoader,
        max_loaded: int,
        poll_s: float,
        retry_after_s: int,
        default_ref: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """`default_ref`: the registry ref of the configured model, if it is registered (it is
        then served only under the configured name)."""
        self.default = default
        self.registry = registry
        self.max_loaded = max_loaded
        self.poll_s = poll_s
        self.retry_after_s = retry_after_s
        self._load = load
        self._default_ref = default_ref
        self._metrics = metrics
        self._catalogue: dict[str, ModelRecord] = {}
        self._marker: tuple[int, datetime | None] | None = None
        self._loaded: dict[str, LoadedModel] = {}
        self._draining: set[LoadedModel] = set()
        """Removed or replaced in the registry, unloaded once their last lease ends."""
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._cards: list[Json] = []
        self._cards_by_name: dict[str, Json] = {}
        self._rebuild_cards()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Read the registry once, then follow it every `poll_s` seconds."""
        await self.refresh()
        self._poller = asyncio.create_task(self._poll(), name="model-registry-poller")

    async def close(self) -> None:
        """Stop polling and unload every model but the configured one (its owner stops it)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for task in list(self._loading.values()):
            with contextlib.suppress(Exception):  # its failure was the requests' to report
                await asyncio.shield(task)
        for model in [*self._loaded.values(), *self._draining]:
            await self._unload(model)
        for unloading in list(self._tasks):
            await unloading
        self._loaded.clear()
        self._draining.clear()

    # -- requests --------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lease(self, name: str | None) -> AsyncIterator[LoadedModel]:
        """The model `name` (the configured one for None), loaded if needed and kept loaded
        until the block ends.

        Raises ModelNotFoundError (not served, not registered), ModelsBusyError (no room),
        and what loading raises (ModelLoadError, ModelDecryptionError, ConfigError).
        """
        model = await self.acquire(name)
        model.num_leases += 1
        try:
            yield model
        finally:
            model.num_leases -= 1
            model.last_used = time.monotonic()
            if model in self._draining and model.num_leases == 0:
                self._spawn(self._unload(model))

    async def acquire(self, name: str | None) -> LoadedModel:
        """The loaded model for `name` (see `lease`, which also holds it loaded)."""
        for _ in range(_MAX_ACQUIRE_TRIES):
            model = await self._acquire_once(name)
            if not model.is_unloaded:  # not evicted between its load and now
                model.last_used = time.monotonic()
                return model
        raise ModelsBusyError(
            "the server is switching models under load; retry shortly",
            retry_after_s=self.retry_after_s,
        )

    @property
    def loaded_names(self) -> list[str]:
        """The models in memory now, the configured one first (diagnostics, tests)."""
        return [self.default.name, *self._loaded, *(m.name for m in self._draining)]

    def cards(self) -> list[Json]:
        """The served and registered models, as `GET /v1/models` lists them (cached)."""
        return self._cards

    def card(self, name: str) -> Json:
        """One model's card. Raises ModelNotFoundError."""
        card = self._cards_by_name.get(name)
        if card is None:
            raise self._not_found(name)
        return card

    # -- registry --------------------------------------------------------------------------
    async def refresh(self, *, force: bool = False) -> None:
        """Re-read the registry if it changed: new models become servable; removed or
        replaced ones stop being served and are unloaded once idle."""
        registry = self.registry
        if registry is not None:
            marker = await asyncio.to_thread(registry.change_marker)
            if force or marker != self._marker:
                records = await asyncio.to_thread(registry.list)
                self._marker = marker
                self._apply(records)
        for model in [m for m in self._draining if m.num_leases == 0]:
            await self._unload(model)

    def _apply(self, records: list[ModelRecord]) -> None:
        catalogue = {r.ref: r for r in records if r.ref != self._default_ref}
        for ref, model in list(self._loaded.items()):
            old, new = self._catalogue.get(ref), catalogue.get(ref)
            if new is None or old is None or _is_replaced(old, new):
                logger.info("model %s was removed or replaced in the registry", ref)
                del self._loaded[ref]
                self._draining.add(model)
        self._catalogue = catalogue
        self._rebuild_cards()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception:  # a database blip must not end the polling; it is logged
                logger.exception("could not read the model registry; retrying")

    # -- loading and unloading -------------------------------------------------------------
    async def _acquire_once(self, name: str | None) -> LoadedModel:
        if name is None or name in self.default.serving.names:
            return self.default
        ref = self._ref(name)
        model = self._loaded.get(ref)
        if model is not None:
            return model
        task = self._loading.get(ref)
        if task is None:
            record = self._catalogue.get(ref)
            if record is None:
                raise self._not_found(name)
            victim = self._make_room(ref)
            task = asyncio.create_task(self._load_model(record, victim), name=f"load {ref}")
            self._loading[ref] = task
        # Shielded: a request that goes away does not cancel a load others may wait for.
        return await asyncio.shield(task)

    def _make_room(self, ref: str) -> LoadedModel | None:
        """The idle model to unload before `ref` is loaded (None: there is room).

        Raises ModelsBusyError when there is no room and every loaded model is in use.
        """
        num_loaded = 1 + len(self._loaded) + len(self._draining) + len(self._loading)
        if num_loaded < self.max_loaded:
            return None
        idle = [m for m in (*self._draining, *self._loaded.values()) if m.num_leases == 0]
        if not idle:
            raise ModelsBusyError(
                f"cannot load model {ref!r}: {num_loaded} models are loaded (max_loaded_models="
                f"{self.max_loaded}) and all are in use; retry after {self.retry_after_s}s",
                retry_after_s=self.retry_after_s,
            )
        victim = min(idle, key=lambda m: (m not in self._draining, m.last_used))
        self._loaded.pop(victim.name, None)
        self._draining.discard(victim)
        return victim

    async def _load_model(self, record: ModelRecord, victim: LoadedModel | None) -> LoadedModel:
        try:
            if victim is not None:
                logger.info("unloading %s to make room for %s", victim.name, record.ref)
                await self._unload(victim)
            started = time.monotonic()
            model = await self._load(record)
        finally:
            del self._loading[record.ref]
        current = self._catalogue.get(record.ref)
        if current is None or _is_replaced(record, current):  # removed or replaced meanwhile
            self._draining.add(model)
        else:
            self._loaded[record.ref] = model
        if self._metrics is not None:
            self._metrics.bind_model(model.name, model.engine)
        logger.info("loaded %s in %.1fs", record.ref, time.monotonic() - started)
        self._rebuild_cards()
        return model

    async def _unload(self, model: LoadedModel) -> None:
        if model.is_unloaded:
            return
        model.is_unloaded = True
        self._draining.discard(model)
        if self._loaded.get(model.name) is model:
            del self._loaded[model.name]
        metrics = self._metrics
        if metrics is not None and metrics.engines.get(model.name) is model.engine:
            metrics.unbind_model(model.name)  # not a newer load of the same name
        await model.engine.shutdown()
        logger.info("unloaded %s", model.name)
        self._rebuild_cards()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- names and cards -------------------------------------------------------------------
    def _ref(self, name: str) -> str:
        try:
            return format_ref(*parse_ref(name))
        except InvalidRequestError:
            raise self._not_found(name) from None

    def _not_found(self, name: str) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"The model {name!r} does not exist; GET /v1/models lists the models served here",
            param="model",
        )

    def _rebuild_cards(self) -> None:
        cards = [self.default.serving.model_card()]
        by_name = dict.fromkeys(self.default.serving.names, cards[0])
        for ref, record in self._catalogue.items():
            card: Json = {
                "id": ref,
                "object": "model",
                "created": _epoch(record.created_at),
                "owned_by": "aicc",
            }
            loaded = self._loaded.get(ref)
            if loaded is not None:
                card["max_model_len"] = loaded.engine.model_info.max_context
            cards.append(card)
            for name in (ref, *aliases_of(ref)):
                by_name.setdefault(name, card)
        self._cards, self._cards_by_name = cards, by_name


def _is_replaced(old: ModelRecord, new: ModelRecord) -> bool:
    """Other weights under the same ref (removed and added again). Encrypting, decrypting and
    re-keying keep the plaintext's sha256, so a loaded model stays."""
    return old.sha256 != new.sha256 or old.created_at != new.created_at


def _epoch(moment: datetime) -> int:
    # SQLite hands back naive datetimes; the registry writes UTC.
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return int(aware.timestamp())
