"""OpenAI-compatible routes. Each one validates, calls the service, translates."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from aicc.api.openai.protocol import ChatCompletionRequest, CompletionRequest
from aicc.api.openai.serving import OpenAIServing
from aicc.api.sse import EventStreamResponse
from aicc.errors import EngineUnavailableError

router = APIRouter()
T = TypeVar("T")


def get_serving(request: Request) -> OpenAIServing:
    serving: OpenAIServing | None = getattr(request.app.state, "serving", None)
    if serving is None:
        raise EngineUnavailableError("the model is still loading; retry shortly")
    return serving


Serving = Annotated[OpenAIServing, Depends(get_serving)]


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, serving: Serving, request: Request
) -> Response:
    prepared = await serving.start_chat(body)
    if body.stream:
        return EventStreamResponse(serving.chat_chunks(prepared))
    completion = await until_disconnected(request, serving.collect(prepared))
    return JSONResponse(serving.chat_response(prepared, completion))


@router.post("/v1/completions", response_model=None)
async def create_completion(
    body: CompletionRequest, serving: Serving, request: Request
) -> Response:
    prepared = await serving.start_completion(body)
    if body.stream:
        return EventStreamResponse(serving.completion_chunks(prepared))
    completion = await until_disconnected(request, serving.collect(prepared))
    return JSONResponse(serving.completion_response(prepared, completion))


@router.get("/v1/models")
async def list_models(serving: Serving) -> dict[str, Any]:
    return {"object": "list", "data": [serving.model_card()]}


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
