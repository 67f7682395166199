"""OpenAI-compatible routes. Each one validates, calls the service, translates."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from aicc.api.access import Caller, Reader
from aicc.api.openai.chat import ChatServing
from aicc.api.openai.protocol import ChatCompletionRequest, CompletionRequest
from aicc.api.openai.serving import OpenAIServing
from aicc.api.sse import EventStreamResponse
from aicc.errors import EngineUnavailableError

router = APIRouter()
T = TypeVar("T")


async def get_serving(request: Request) -> OpenAIServing:
    serving: OpenAIServing | None = getattr(request.app.state, "serving", None)
    if serving is None:
        raise EngineUnavailableError("the model is still loading; retry shortly")
    return serving


async def get_chat(request: Request) -> ChatServing:
    chat: ChatServing | None = getattr(request.app.state, "chat", None)
    if chat is None:
        raise EngineUnavailableError("the model is still loading; retry shortly")
    return chat


Serving = Annotated[OpenAIServing, Depends(get_serving)]
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
async def list_models(serving: Serving, principal: Reader) -> dict[str, Any]:
    """The models this caller may use."""
    cards = [serving.model_card()]
    allowed = [card for card in cards if principal.can_use_model(card["id"])]
    return {"object": "list", "data": allowed}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, serving: Serving, _: Reader) -> dict[str, Any]:
    # `:path`: served names may contain "/" (e.g. "org/model"); the allow-list is checked.
    serving.check_model(model_id)
    return serving.model_card()


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
