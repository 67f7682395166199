"""`POST /tokenize` and `POST /detokenize`, in llama-server's shape.

The content is bounded by the request-body limit (`max_body_bytes`, enforced by middleware).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from aicc.api.access import Reader
from aicc.api.openai.routes import ReaderServing
from aicc.api.openai.serving import off_loop_if_large
from aicc.engine.interface import EngineClient


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


router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, serving: ReaderServing, _: Reader) -> dict[str, Any]:
    return await off_loop_if_large(len(body.content), _tokenize, serving.engine, body)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, serving: ReaderServing, _: Reader) -> dict[str, str]:
    """Special tokens are rendered as their text. Ids outside the vocabulary → 400."""
    engine = serving.engine
    return {"content": await off_loop_if_large(len(body.tokens), engine.detokenize, body.tokens)}


def _tokenize(engine: EngineClient, body: TokenizeRequest) -> dict[str, Any]:
    token_ids = engine.tokenize(body.content, add_special=body.add_special)
    if not body.with_pieces:
        return {"tokens": token_ids}
    # A piece that is part of a UTF-8 character shows as U+FFFD (llama-server gives its bytes).
    pieces = [{"id": token, "piece": engine.detokenize([token])} for token in token_ids]
    return {"tokens": pieces}
