"""OpenAI-compatible routes. Each one validates, calls the service, translates."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from aicc.api.access import Caller, InferenceCaller, Reader, requested_model
from aicc.api.disconnect import until_disconnected
from aicc.api.models import LoadedModel, ModelPool
from aicc.api.openai.chat import ChatServing
from aicc.api.openai.protocol import ChatCompletionRequest, CompletionRequest
from aicc.api.openai.serving import OpenAIServing
from aicc.api.proxy import RoutedCall, forward, renamed
from aicc.api.record import call_record
from aicc.api.sse import EventStreamResponse
from aicc.auth.principal import Principal
from aicc.errors import AiccError, EngineUnavailableError
from aicc.router.service import NoReplicaError, Router

router = APIRouter()


def model_pool(request: Request) -> ModelPool:
    pool: ModelPool | None = getattr(request.app.state, "pool", None)
    if pool is None:
        raise EngineUnavailableError("the model is still loading; retry shortly")
    return pool


@asynccontextmanager
async def leased_model(request: Request) -> AsyncIterator[LoadedModel]:
    async with model_pool(request).lease(await requested_model(request)) as model:
        yield model


# Each depends on the route's access check, so that only a caller allowed to use the model
# gets it loaded; the lease holds it loaded until the response has been sent.
async def get_serving(request: Request, _: Caller) -> AsyncIterator[OpenAIServing]:
    async with leased_model(request) as model:
        yield model.serving


async def get_chat(request: Request, _: Caller) -> AsyncIterator[ChatServing]:
    async with leased_model(request) as model:
        yield model.chat


async def get_reader_serving(request: Request, _: Reader) -> AsyncIterator[OpenAIServing]:
    async with leased_model(request) as model:
        yield model.serving


Serving = Annotated[OpenAIServing, Depends(get_serving)]
ReaderServing = Annotated[OpenAIServing, Depends(get_reader_serving)]
"""For routes that generate nothing (tokenization): the lighter `Reader` access check."""
Chat = Annotated[ChatServing, Depends(get_chat)]


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request is served: an in-process model, and the deployment call (if the model
    names a deployment) whose replica is either that model or a remote server."""

    model: LoadedModel | None
    call: RoutedCall | None = None

    @property
    def is_remote(self) -> bool:
        return self.model is None

    def public(self, name: str) -> str:
        """The model name to show the client (a deployment's, for a local replica)."""
        return self.call.model if self.call is not None else name

    def chunks(
        self, chunks: AsyncIterator[list[dict[str, Any]]]
    ) -> AsyncIterator[list[dict[str, Any]]]:
        return chunks if self.call is None else renamed(chunks, self.call.model)

    async def respond(
        self,
        work: Callable[[LoadedModel], Awaitable[Response]],
        request: Request,
        caller: InferenceCaller,
        path: str,
    ) -> Response:
        """The local model's response; a deployment's call that its local replica cannot
        take (down or full) is retried on a remote replica."""
        assert self.model is not None
        call = self.call
        if call is None:
            return await work(self.model)
        return await call.run_local(work(self.model), lambda: forward(request, caller, call, path))


async def get_target(request: Request, caller: Caller) -> AsyncIterator[Target]:
    """The pool's model for the request, or the deployment's variant and first replica (a
    local replica's model leased like any other). Depends on the access check first."""
    model_name = await requested_model(request)
    deployments: Router | None = getattr(request.app.state, "router", None)
    if deployments is None or not deployments.has(model_name):
        async with leased_model(request) as model:
            yield Target(model)
        return
    assert model_name is not None
    call = routed_call(request, deployments, model_name, caller.principal)
    replica = call.replica
    if replica is None or replica.local_model is None:
        yield Target(None, call)
        return
    with deployments.acquire(replica):
        async with model_pool(request).lease(replica.local_model) as model:
            yield Target(model, call)


def routed_call(request: Request, router: Router, model: str, principal: Principal) -> RoutedCall:
    """The deployment call with its variant and first replica chosen; a call no replica can
    take is a `_Refused` one (answered with its error by `dispatch`). Raises the variant
    choice's errors (a variant override without permission, an unknown variant)."""
    variant = router.choose_variant(model, principal, request.headers)
    call = RoutedCall(router, model, variant, call_record(request))
    try:
        call.pick()
    except AiccError as exc:
        if isinstance(exc, NoReplicaError):  # the variant fails its requests
            router.observe_variant(model, variant.name, ok=False, latency_s=0.0)
        return _Refused(call, exc)
    return call


class _Refused(RoutedCall):
    """A deployment call no replica could take: answered with its (tagged) error."""

    def __init__(self, call: RoutedCall, exc: AiccError) -> None:
        super().__init__(call.router, call.model, call.variant, call.record)
        self.refusal = exc


async def dispatch(
    request: Request, caller: InferenceCaller, call: RoutedCall | None, path: str
) -> Response:
    """A remote replica's (or a refused call's) response."""
    assert call is not None
    if isinstance(call, _Refused):
        return call.error(call.refusal)
    return await forward(request, caller, call, path)


Routed = Annotated[Target, Depends(get_target)]


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, target: Routed, caller: Caller, request: Request
) -> Response:
    if target.is_remote:
        return await dispatch(request, caller, target.call, "/v1/chat/completions")

    async def serve(model: LoadedModel) -> Response:
        chat, local = model.chat, body.model_copy(update={"model": model.name})
        prepared, plan = await chat.start(local, caller.cache_scope, caller.metering)
        if body.stream:
            return EventStreamResponse(target.chunks(chat.chunks(prepared, plan)))
        collected = await until_disconnected(request, chat.core.collect(prepared))
        answer = chat.response(prepared, plan, collected)
        return JSONResponse({**answer, "model": target.public(answer["model"])})

    return await target.respond(serve, request, caller, "/v1/chat/completions")


@router.post("/v1/completions", response_model=None)
async def create_completion(
    body: CompletionRequest, target: Routed, caller: Caller, request: Request
) -> Response:
    if target.is_remote:
        return await dispatch(request, caller, target.call, "/v1/completions")

    async def serve(model: LoadedModel) -> Response:
        serving, local = model.serving, body.model_copy(update={"model": model.name})
        prepared = await serving.start_completion(local, caller.cache_scope, caller.metering)
        if body.stream:
            return EventStreamResponse(target.chunks(serving.completion_chunks(prepared)))
        completion = await until_disconnected(request, serving.collect(prepared))
        answer = serving.completion_response(prepared, completion)
        return JSONResponse({**answer, "model": target.public(answer["model"])})

    return await target.respond(serve, request, caller, "/v1/completions")


@router.get("/v1/models")
async def list_models(request: Request, principal: Reader) -> dict[str, Any]:
    """The models this caller may use: the served ones and every registered one."""
    cards = model_pool(request).cards()
    deployments: Router | None = getattr(request.app.state, "router", None)
    if deployments is not None:
        cards = [*cards, *deployments.cards()]
    allowed = [card for card in cards if principal.can_use_model(card["id"])]
    return {"object": "list", "data": allowed}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request, _: Reader) -> dict[str, Any]:
    # `:path`: served names may contain "/" (e.g. "org/model"); the allow-list is checked.
    deployments: Router | None = getattr(request.app.state, "router", None)
    if deployments is not None and deployments.has(model_id):
        return deployments.card(model_id)
    return model_pool(request).card(model_id)
