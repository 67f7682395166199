"""`EngineClient` over llama.cpp: the event-loop side of the engine thread."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from aicc.engine.llamacpp.embedder import EmbedderConfig, EmbeddingManager, embedding_ctx_size
from aicc.engine.llamacpp.loop import Abort, Delivery, EngineLoop, Stop, StreamItem, Submit
from aicc.engine.llamacpp.model import ContextConfig, LlamaModel
from aicc.engine.llamacpp.runner import BatchRunner
from aicc.engine.llamacpp.sampler import GrammarError, new_grammar
from aicc.engine.scheduler import Scheduler, SchedulerConfig
from aicc.engine.types import (
    EngineHealth,
    EngineStats,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    StepSample,
    TokenEvent,
)
from aicc.errors import (
    ContextLengthExceededError,
    EngineUnavailableError,
    InvalidRequestError,
    QueueFullError,
    RequestTimeoutError,
)

_STALL_LIMIT_S = 120.0
"""A loop that has not ticked for this long is reported not ready."""
_MAX_EMBEDDING_SEQS = 64
"""Sequence ids of the embeddings context (inputs embedded together, plus one for padding)."""
_INVARIANT_EMBEDDING_BATCH = 64
"""Rows per embeddings decode call in batch-invariant mode (see `embedder.py`)."""


@dataclass(frozen=True, slots=True)
class LlamaCppConfig:
    model_path: Path
    model_name: str
    context: ContextConfig
    max_queue: int
    request_timeout_s: float
    retry_after_s: int
    prefix_caching: bool = False
    prefix_shared_across_scopes: bool = False
    embedding_ctx_size: int = 2048
    """Asked size of the embeddings context (capped by the model's training context)."""


class LlamaCppEngine:
    """Loads the model, runs `EngineLoop` in a thread, and streams its events to coroutines."""

    def __init__(self, config: LlamaCppConfig) -> None:
        self.config = config
        self._model: LlamaModel | None = None
        self._loop_runner: EngineLoop | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._num_outstanding = 0
        self._embeddings: EmbeddingManager | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        config = self.config
        self._model = await asyncio.to_thread(
            LlamaModel, config.model_path, config.model_name, config.context
        )
        model = self._model
        scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.context.num_seq,
                max_num_batched_tokens=config.context.num_batch,
                num_kv_cells=model.num_ctx,
                max_model_len=model.info.max_context,
                is_batch_invariant=config.context.batch_invariant,
                num_prefix_slots=config.context.num_prefix_slots,
                is_prefix_caching=config.prefix_caching,
                is_prefix_shared_across_scopes=config.prefix_shared_across_scopes,
            )
        )
        runner = BatchRunner(model, config.context.num_batch)
        self._loop_runner = EngineLoop(model, runner, scheduler, self._deliver_threadsafe)
        self._loop_runner.thread.start()
        # Cheap: the embeddings context itself is created on the first embeddings request.
        self._embeddings = EmbeddingManager(
            model, self._embedder_config(model), config.request_timeout_s
        )

    async def shutdown(self) -> None:
        engine_loop = self._loop_runner
        if engine_loop is not None:
            engine_loop.inbox.put(Stop())
            await asyncio.to_thread(engine_loop.thread.join)
            engine_loop.runner.close()
            self._loop_runner = None
        if self._embeddings is not None:
            await self._embeddings.close()
            self._embeddings = None
        if self._model is not None:
            self._model.close()
            self._model = None

    # -- EngineClient ----------------------------------------------------------------------
    @property
    def model_info(self) -> ModelInfo:
        return self._require_model().info

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return self._require_model().tokenize(text, add_special=add_special)

    def generate(self, request: GenerationRequest) -> RequestStream:
        engine_loop = self._require_loop()
        max_tokens = self._check_fits(request)
        self._check_params(request.params)
        max_outstanding = self.config.context.num_seq + self.config.max_queue
        if self._num_outstanding >= max_outstanding:
            raise QueueFullError(
                f"the server is busy: {self._num_outstanding} requests are running or queued "
                f"(limit {max_outstanding}); retry after {self.config.retry_after_s}s",
                retry_after_s=self.config.retry_after_s,
            )
        out: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._num_outstanding += 1
        engine_loop.inbox.put(Submit(request, max_tokens, out))
        deadline = asyncio.get_running_loop().time() + self.config.request_timeout_s
        return RequestStream(self, request.request_id, out, deadline, request.params.n)

    def abort(self, request_id: str) -> None:
        if self._loop_runner is not None:
            self._loop_runner.inbox.put(Abort(request_id))

    def health(self) -> EngineHealth:
        engine_loop = self._loop_runner
        if self._model is None or engine_loop is None:
            return EngineHealth(False, "model not loaded")
        if engine_loop.error is not None or not engine_loop.thread.is_alive():
            return EngineHealth(False, f"engine loop stopped: {engine_loop.error!r}")
        stalled_s = time.monotonic() - engine_loop.last_tick
        if stalled_s > _STALL_LIMIT_S:
            return EngineHealth(False, f"engine loop stalled for {stalled_s:.0f}s")
        return EngineHealth(True, "ready")

    def stats(self) -> EngineStats:
        engine_loop = self._require_loop()
        scheduler = engine_loop.scheduler
        counters = engine_loop.counters
        return EngineStats(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            num_outstanding=self._num_outstanding,
            kv_cells_used=scheduler.num_kv_cells_used,
            kv_cells_total=scheduler.config.num_kv_cells,
            num_steps=counters.num_steps,
            num_preemptions=scheduler.num_preemptions,
            num_cached_prefixes=scheduler.prefixes.num_shareable,
            num_prefix_hit_tokens=scheduler.prefixes.num_hit_tokens,
            num_finished=counters.num_finished,
            num_aborted=counters.num_aborted,
            last_step_batch_size=counters.last_step_batch_size,
        )

    def drain_step_samples(self) -> list[StepSample]:
        engine_loop = self._loop_runner
        if engine_loop is None:
            return []
        samples = engine_loop.step_samples
        # Only this method pops, so the length cannot shrink under us while the thread appends.
        return [samples.popleft() for _ in range(len(samples))]

    @property
    def embedding_size(self) -> int:
        return self._require_embeddings().embedding_size

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        return await self._require_embeddings().embed(inputs)

    def detokenize(self, token_ids: list[int]) -> str:
        return self._require_model().detokenize(token_ids)

    # -- helpers ---------------------------------------------------------------------------
    def _check_fits(self, request: GenerationRequest) -> int:
        """Validate the prompt against the context; return the effective max_tokens."""
        num_prompt = len(request.prompt_token_ids)
        if num_prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        max_context = self.model_info.max_context
        asked = request.params.max_tokens
        if num_prompt >= max_context or (asked is not None and num_prompt + asked > max_context):
            wanted = num_prompt + (asked or 1)
            raise ContextLengthExceededError(
                f"This model's maximum context length is {max_context} tokens. However, you "
                f"requested {wanted} tokens ({num_prompt} in the prompt, {asked or 1} for the "
                "completion). Please reduce the length of the prompt or the completion.",
                param="messages",
            )
        return asked if asked is not None else max_context - num_prompt

    def _check_params(self, params: SamplingParams) -> None:
        """Refuse what the engine cannot do before it reaches the engine thread."""
        if params.n > self.config.context.num_seq:
            raise InvalidRequestError(
                f"n={params.n} exceeds this server's batch of {self.config.context.num_seq}",
                param="n",
            )
        if params.grammar is not None:
            try:  # parse once here, so a bad grammar is a 400 and not a failed stream
                llama_cpp.llama_sampler_free(
                    new_grammar(self._require_model().vocab, params.grammar)
                )
            except GrammarError as exc:
                raise InvalidRequestError(f"the output grammar is invalid: {exc}") from None

    def _deliver_threadsafe(self, items: Delivery) -> None:
        """Called on the engine thread: hand one step's events to the event loop at once."""
        assert self._event_loop is not None
        self._event_loop.call_soon_threadsafe(_put_all, items)

    def _release(self, request_id: str, *, abort: bool) -> None:
        self._num_outstanding -= 1
        if abort:
            self.abort(request_id)

    def _embedder_config(self, model: LlamaModel) -> EmbedderConfig:
        context = self.config.context
        num_batch = _INVARIANT_EMBEDDING_BATCH if context.batch_invariant else context.num_batch
        return EmbedderConfig(
            num_ctx=embedding_ctx_size(model, self.config.embedding_ctx_size),
            num_batch=num_batch,
            max_num_seqs=min(_MAX_EMBEDDING_SEQS, num_batch),
            num_threads=context.num_threads,
        )

    def _require_embeddings(self) -> EmbeddingManager:
        if self._embeddings is None:
            raise EngineUnavailableError("the model is not loaded")
        return self._embeddings

    def _require_model(self) -> LlamaModel:
        if self._model is None:
            raise EngineUnavailableError("the model is not loaded")
        return self._model

    def _require_loop(self) -> EngineLoop:
        engine_loop = self._loop_runner
        if engine_loop is None or not engine_loop.thread.is_alive():
            raise EngineUnavailableError("the engine is not running")
        return engine_loop


class RequestStream:
    """Async iterator of one request's events. Closing it early aborts the request."""

    def __init__(
        self,
        engine: LlamaCppEngine,
        request_id: str,
        out: asyncio.Queue[StreamItem],
        deadline: float,
        num_choices: int = 1,
    ) -> None:
        self._engine = engine
        self._request_id = request_id
        self._out = out
        self._deadline = deadline
        self._num_open = num_choices
        """Choices not finished yet; the stream ends when the last one does."""
        self._is_done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._is_done:
            raise StopAsyncIteration
        try:
            async with asyncio.timeout_at(self._deadline):
                item = await self._out.get()
        except TimeoutError:
            self._close(abort=True)
            raise RequestTimeoutError(
                f"the request ran past {self._engine.config.request_timeout_s:g}s and was aborted"
            ) from None
        except asyncio.CancelledError:
            self._close(abort=True)
            raise
        if isinstance(item, BaseException):
            self._close(abort=False)
            raise EngineUnavailableError(f"the engine failed: {item}") from item
        if item.finish_reason is not None:
            self._num_open -= 1
            if self._num_open == 0:
                self._close(abort=False)
        return item

    async def aclose(self) -> None:
        self._close(abort=True)

    def _close(self, *, abort: bool) -> None:
        if not self._is_done:
            self._is_done = True
            self._engine._release(self._request_id, abort=abort)


def _put_all(items: Delivery) -> None:
    for out, item in items:
        out.put_nowait(item)
