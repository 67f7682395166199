"""The one interface the gateway uses to reach any engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from aicc.engine.types import (
    EngineHealth,
    EngineStats,
    GenerationRequest,
    ModelInfo,
    StepSample,
    TokenEvent,
)


class EngineClient(Protocol):
    """An engine serving one model. Implementations register in `aicc.engine.registry`."""

    @property
    def model_info(self) -> ModelInfo: ...

    async def start(self) -> None:
        """Load the model and start the engine loop. Raises `ModelLoadError`."""

    async def shutdown(self) -> None:
        """Abort everything in flight and free the model."""

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Token ids of `text`; special-token markup in `text` is parsed."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream the completion of `request`.

        Raises `ContextLengthExceededError` when prompt + max_tokens cannot fit,
        `QueueFullError` when too many requests wait, `EngineUnavailableError` when stopped.
        Closing the iterator early aborts the request and frees its KV cache.
        """

    def abort(self, request_id: str) -> None:
        """Cancel a request; its sequence leaves the batch at the next step."""

    def health(self) -> EngineHealth: ...

    def stats(self) -> EngineStats: ...

    def drain_step_samples(self) -> list[StepSample]:
        """The steps run since the last call, oldest first (a bounded buffer: the oldest are
        dropped when nobody drains it); empty when the engine is stopped."""

    @property
    def embedding_size(self) -> int:
        """Length of the vectors `embed` returns. Raises `EngineUnavailableError` if stopped."""

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One unit-length (L2) vector per input of token ids, in order.

        Raises `InvalidRequestError` for no inputs, an empty input or ids outside the vocabulary,
        `ContextLengthExceededError` for an input longer than the embeddings context,
        `RequestTimeoutError`, and `EngineUnavailableError` when stopped.
        """

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, special tokens rendered as their text (`<bos>`).

        Raises `InvalidRequestError` for ids outside the vocabulary.
        """
