"""`POST /v1/embeddings` in OpenAI's shape: the body, the service, and the route."""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from aicc.api.access import Caller
from aicc.api.disconnect import until_disconnected
from aicc.api.models import LoadedModel
from aicc.api.openai.routes import Routed, dispatch
from aicc.api.openai.serving import Metering, OpenAIServing, off_loop_if_large
from aicc.errors import InvalidRequestError

MAX_INPUTS = 2048
"""Most inputs one request may embed (OpenAI's limit)."""

Json = dict[str, Any]
TokenIds = list[int]


class EmbeddingRequest(BaseModel):
    # Unknown fields are ignored, as OpenAI does.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | TokenIds | list[TokenIds]
    """A string, a list of strings, a list of token ids, or a list of token-id lists (at most
    `MAX_INPUTS` inputs)."""
    encoding_format: Literal["float", "base64"] = "float"
    """`base64`: each vector as little-endian float32 bytes, base64-encoded."""
    dimensions: int | None = Field(default=None, ge=1)
    """Keep the first `dimensions` components and rescale to unit length (Matryoshka-style
    truncation). Meaningful for models trained for it; must not exceed the embedding size."""
    user: str | None = Field(default=None, max_length=256)

    @field_validator("input", mode="wrap")
    @classmethod
    def _check_input(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # One clear message instead of one per branch of the union.
        is_many = isinstance(value, list) and value and not isinstance(value[0], int)
        if is_many and len(value) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs are allowed, got {len(value)}")
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(
                "input must be a string, a list of strings, a list of token ids, or a list of "
                "token-id lists"
            ) from None


class EmbeddingServing:
    """Turns an `EmbeddingRequest` into token ids, embeds them, and shapes OpenAI's response."""

    def __init__(self, core: OpenAIServing) -> None:
        self.core = core
        self.engine = core.engine

    async def create(self, body: EmbeddingRequest, metering: Metering | None = None) -> Json:
        """The response body. Raises `ModelNotFoundError`, `InvalidRequestError`, and what
        `EngineClient.embed` raises."""
        self.core.check_model(body.model)
        size = self.engine.embedding_size
        if body.dimensions is not None and body.dimensions > size:
            raise InvalidRequestError(
                f"dimensions must be at most {size} (this model's embedding size), "
                f"got {body.dimensions}",
                param="dimensions",
            )
        inputs = await self._token_inputs(body.input)
        vectors = np.asarray(await self.engine.embed(inputs), dtype=np.float32)
        if body.dimensions is not None and body.dimensions < size:
            vectors = _unit_rows(vectors[:, : body.dimensions])
        encode = _base64 if body.encoding_format == "base64" else _floats
        num_tokens = sum(len(tokens) for tokens in inputs)
        if metering is not None:
            if metering.usage is not None:
                metering.usage.record(num_tokens, 0)
            if metering.record is not None:
                metering.record.num_prompt_tokens = num_tokens
                metering.record.num_completion_tokens = 0
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": index, "embedding": encode(row)}
                for index, row in enumerate(vectors)
            ],
            "model": self.core.served_name,
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
        }

    async def _token_inputs(
        self, given: str | list[str] | TokenIds | list[TokenIds]
    ) -> list[TokenIds]:
        """Every input as token ids. Raises `InvalidRequestError` for empty inputs."""
        if isinstance(given, str):
            given = [given]
        if not given:
            raise InvalidRequestError("input must not be an empty list", param="input")
        if isinstance(given[0], int):
            return [[int(token) for token in given]]  # one input given as token ids
        for index, item in enumerate(given):
            if not item:
                kind = "string" if isinstance(item, str) else "list of token ids"
                raise InvalidRequestError(f"input[{index}] is an empty {kind}", param="input")
        if isinstance(given[0], list):
            return [[int(token) for token in item] for item in given]
        texts = [str(item) for item in given]
        return await off_loop_if_large(sum(map(len, texts)), self._tokenize_all, texts)

    def _tokenize_all(self, texts: list[str]) -> list[TokenIds]:
        # With the model's special tokens (BOS), as llama-server embeds text.
        return [self.engine.tokenize(text, add_special=True) for text in texts]


def _unit_rows(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: npt.NDArray[np.float32] = vectors / np.maximum(norms, np.float32(1e-12))
    return unit


def _floats(row: npt.NDArray[np.float32]) -> list[float]:
    values: list[float] = row.tolist()
    return values


def _base64(row: npt.NDArray[np.float32]) -> str:
    # What the openai SDK decodes: raw little-endian float32, base64.
    return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")


# -- route ---------------------------------------------------------------------------------
router = APIRouter()


@router.post("/v1/embeddings", response_model=None)
async def create_embeddings(
    body: EmbeddingRequest, target: Routed, caller: Caller, request: Request
) -> Response:
    if target.is_remote:
        return await dispatch(request, caller, target.call, "/v1/embeddings")

    async def serve(model: LoadedModel) -> Response:
        # A client that goes away stops the work between groups of inputs.
        local = body.model_copy(update={"model": model.name})
        work = EmbeddingServing(model.serving).create(local, caller.metering)
        answer = await until_disconnected(request, work)
        return JSONResponse({**answer, "model": target.public(answer["model"])})

    return await target.respond(serve, request, caller, "/v1/embeddings")
