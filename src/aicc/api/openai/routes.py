"""OpenAI-compatible routes. Each one validates, calls the service, translates."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from aicc.api.access import Caller, Reader
from aicc.api.models import LoadedModel, ModelPool
from aicc.api.openai.chat import ChatServing
from aicc.api.openai.protocol import ChatCompletionRequest, CompletionRequest
from aicc.api.openai.serving import OpenAIServing
from aicc.api.sse import EventStreamResponse
from aicc.errors import EngineUnavailableError

router = APIRouter()
T = TypeVar("T")


def model_pool(request: Request) -> ModelPool:
    pool: ModelPool | None = getattr(request.app.state, "pool", None)
    if pool is None:
        raise EngineUnavailableError("the model is still loading; retry shortly")
    return pool


async def requested_model(request: Request) -> str | None:
    """The `model` a POST body names (None: none, or a body the route's validation refuses).
    FastAPI has parsed the body already; `Request.json` returns that parse."""
    if request.method != "POST":
        return None
    try:
        body: Any = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


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


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, chat: Chat, caller: Caller, request: Request
) -> Response:
    prepared, plan = await chat.start(body, caller.cache_scope, caller.metering)
    if body.stream:
        return EventStreamResponse(chat.chunks(prepared, plan))
    collected = await until_disconnected(request, chat.core.collect(prepared))
    return JSONResponse(chat.response(prepared, plan, collected))


@router.post("/v1/completions", response_model=None)
async def create_completion(
    body: CompletionRequest, serving: Serving, caller: Caller, request: Request
) -> Response:
    prepared = await serving.start_completion(body, caller.cache_scope, caller.metering)
    if body.stream:
        return EventStreamResponse(serving.completion_chunks(prepared))
    completion = await until_disconnected(request, serving.collect(prepared))
    return JSONResponse(serving.completion_response(prepared, completion))


@router.get("/v1/models")
async def list_models(request: Request, principal: Reader) -> dict[str, Any]:
    """The models this caller may use: the served ones and every registered one."""
    cards = model_pool(request).cards()
    allowed = [card for card in cards if principal.can_use_model(card["id"])]
    return {"object": "list", "data": allowed}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request, _: Reader) -> dict[str, Any]:
    # `:path`: served names may contain "/" (e.g. "org/model"); the allow-list is checked.
    return model_pool(request).card(model_id)


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its generation) if the client goes away."""
    task: asyncio.Task[T] = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return await task


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
