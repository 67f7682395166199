"""`POST /tokenize` and `POST /detokenize`, in llama-server's shape.

The content is bounded by the request-body limit (`max_body_bytes`, enforced by middleware).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from aicc.engine.interface import EngineClient
from aicc.errors import EngineUnavailableError

_LARGE_CONTENT_CHARS = 16384
"""Content longer than this is handled in a worker thread, off the event loop."""


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    content: str
    add_special: bool = False
    """Add the model's special tokens (BOS) as a prompt would have them."""
    with_pieces: bool = False
    """Return `{"id", "piece"}` objects instead of bare ids."""


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[int]


def get_engine(request: Request) -> EngineClient:
    engine: EngineClient | None = getattr(request.app.state, "engine", None)
    if engine is None:
        raise EngineUnavailableError("the model is still loading; retry shortly")
    return engine


Engine = Annotated[EngineClient, Depends(get_engine)]
router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, engine: Engine) -> dict[str, Any]:
    if len(body.content) > _LARGE_CONTENT_CHARS:
        return await asyncio.to_thread(_tokenize, engine, body)
    return _tokenize(engine, body)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, engine: Engine) -> dict[str, str]:
    """Special tokens are rendered as their text. Ids outside the vocabulary → 400."""
    if len(body.tokens) > _LARGE_CONTENT_CHARS:
        return {"content": await asyncio.to_thread(engine.detokenize, body.tokens)}
    return {"content": engine.detokenize(body.tokens)}


def _tokenize(engine: EngineClient, body: TokenizeRequest) -> dict[str, Any]:
    token_ids = engine.tokenize(body.content, add_special=body.add_special)
    if not body.with_pieces:
        return {"tokens": token_ids}
    # A piece that is part of a UTF-8 character shows as U+FFFD (llama-server gives its bytes).
    pieces = [{"id": token, "piece": engine.detokenize([token])} for token in token_ids]
    return {"tokens": pieces}
