"""Embeddings: a second llama.cpp context on the already-loaded model, pooled per sequence.

The context is created on the first embeddings request, so servers that never embed spend no
memory on it. It is never touched by the engine thread: callers run `Embedder.embed` in a
worker thread, one group of inputs at a time.

Why we pool in numpy instead of asking llama.cpp to (`pooling_type` MEAN and
`llama_get_embeddings_seq`): llama.cpp pools per physical batch, so every sequence would have to
fit one `llama_decode` call, and an embeddings context keeps a row of vocabulary-sized logits
for every token of that call (generative models still run their LM head). For Gemma 3's 262k
vocabulary that is 2 MiB per token: a 2,048-token input would cost ~4 GiB. Reading per-token
embeddings instead lets a long input span several small decode calls (causal attention keeps
the earlier chunks in the KV cache), so memory is bounded by `num_batch`, not by the input. The
result is the same mean (measured: equal to llama.cpp's pooled vector within float rounding).

Batch invariance. llama.cpp's CPU kernels compute a row differently depending on where it falls
in a group of four rows, on how a sequence is split across calls, and on the size of the call
(measured on the bundled model: up to ~1e-2 per component of a unit vector, cosine > 0.999).
So each input starts on a multiple of four rows (padding rows go to a sequence of their own),
short inputs are decoded whole in one call, and an input longer than one call gets a group of
its own, split exactly as it would be alone. With calls of at most 64 rows (the engine's
`batch_invariant` mode) an input's vector is then bit-identical alone or in any batch
(measured on CPU; larger calls take a different kernel path, GPUs give no such promise).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import llama_cpp
import numpy as np
import numpy.typing as npt

from aicc.engine.llamacpp.model import LlamaModel
from aicc.errors import (
    AiccError,
    ContextLengthExceededError,
    EngineUnavailableError,
    InvalidRequestError,
    ModelLoadError,
    RequestTimeoutError,
)

Vectors = npt.NDArray[np.float32]


class Pooling(IntEnum):
    """How token embeddings become one vector (llama.cpp's `llama_pooling_type` values)."""

    MEAN = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    CLS = llama_cpp.LLAMA_POOLING_TYPE_CLS
    """The first token's embedding."""
    LAST = llama_cpp.LLAMA_POOLING_TYPE_LAST
    """The last token's embedding (decoder-based embedding models, e.g. Qwen3-Embedding)."""


@dataclass(frozen=True, slots=True)
class EmbedderConfig:
    num_ctx: int
    """The longest input, in tokens."""
    num_batch: int
    """Most tokens one `llama_decode` call carries (bounds the logits buffer, see above)."""
    max_num_seqs: int
    """Sequence ids of the context; one is kept for padding rows. At most `num_batch`."""
    num_threads: int

    @property
    def max_group_tokens(self) -> int:
        """Rows of one decode call, a whole number of row groups."""
        return self.num_batch - self.num_batch % ROW_ALIGN

    @property
    def max_group_inputs(self) -> int:
        return self.max_num_seqs - 1


ROW_ALIGN = 4
"""Rows llama.cpp's CPU matmul kernels handle together (see batch invariance above)."""


def aligned(num_tokens: int) -> int:
    return num_tokens + -num_tokens % ROW_ALIGN


def embedding_ctx_size(model: LlamaModel, asked: int) -> int:
    """The embeddings context size: `asked`, or the model's training context if smaller."""
    num_ctx_train = llama_cpp.llama_model_n_ctx_train(model.model)
    return min(asked, num_ctx_train) if num_ctx_train > 0 else asked


def model_pooling(model: LlamaModel) -> Pooling:
    """The GGUF's own pooling type when it defines a usable one, else mean pooling."""
    value = model.metadata(f"{model.info.architecture}.pooling_type")
    if value is not None and value.isdigit() and int(value) in {p.value for p in Pooling}:
        return Pooling(int(value))
    return Pooling.MEAN


def plan_groups(lengths: Sequence[int], max_num_seqs: int, max_num_tokens: int) -> list[list[int]]:
    """Split inputs (by index, in order) into groups of at most `max_num_seqs` inputs and
    `max_num_tokens` row-aligned tokens; a longer input gets a group of its own."""
    groups: list[list[int]] = []
    current: list[int] = []
    num_tokens = 0
    for index, length in enumerate(lengths):
        size = aligned(length)
        if current and (len(current) == max_num_seqs or num_tokens + size > max_num_tokens):
            groups.append(current)
            current, num_tokens = [], 0
        if size > max_num_tokens:
            groups.append([index])
            continue
        current.append(index)
        num_tokens += size
    if current:
        groups.append(current)
    return groups


class Embedder:
    """Owns the embeddings `llama_context` and its batch. Thread-safe; free with `close()`."""

    def __init__(self, model: LlamaModel, config: EmbedderConfig) -> None:
        """Create the context on `model`'s weights. Raises `ModelLoadError`."""
        if not 2 <= config.max_num_seqs <= config.num_batch:
            # llama.cpp aborts the process when n_seq_max exceeds the outputs of one batch.
            raise ModelLoadError(
                f"embeddings need 2 <= max_num_seqs ({config.max_num_seqs}) <= "
                f"num_batch ({config.num_batch})"
            )
        self.config = config
        self.pooling = model_pooling(model)
        self.embedding_size: int = llama_cpp.llama_model_n_embd_out(model.model)
        self._lock = threading.Lock()
        self._ctx = llama_cpp.llama_init_from_model(model.model, _context_params(config))
        if not self._ctx:
            raise ModelLoadError("llama.cpp could not create the embeddings context")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(config.num_batch, 0, 1)
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(config.num_batch,))
        self._positions = np.ctypeslib.as_array(self._batch.pos, shape=(config.num_batch,))
        np.ctypeslib.as_array(self._batch.n_seq_id, shape=(config.num_batch,))[:] = 1
        # Embeddings contexts output every token; the flags are set for llama.cpp's checks.
        np.ctypeslib.as_array(self._batch.logits, shape=(config.num_batch,))[:] = 1
        self._seq_ids = [self._batch.seq_id[i] for i in range(config.num_batch)]

    def embed(self, inputs: Sequence[Sequence[int]]) -> Vectors:
        """Unit-length vectors, one row per input, for one group from `plan_groups`.

        Raises `EngineUnavailableError` after `close()`, `AiccError` if llama_decode fails.
        """
        pad_seq = self.config.max_num_seqs - 1
        tokens, seq_ids, positions = _layout(inputs, pad_seq)
        # One row per sequence id; the padding sequence's row is pooled too, then dropped.
        lengths = np.zeros(self.config.max_num_seqs, dtype=np.int64)
        lengths[: len(inputs)] = [len(t) for t in inputs]
        pooled = np.zeros((self.config.max_num_seqs, self.embedding_size), dtype=np.float32)
        step = self.config.max_group_tokens
        with self._lock:
            if not self._ctx:
                raise EngineUnavailableError("the engine is shutting down")
            # The previous group's KV cells must not be attended to.
            llama_cpp.llama_memory_clear(self._memory, True)
            for start in range(0, len(tokens), step):
                end = min(start + step, len(tokens))
                rows = self._decode(tokens[start:end], positions[start:end], seq_ids[start:end])
                self._pool(pooled, rows, seq_ids[start:end], positions[start:end], lengths)
        pooled = pooled[: len(inputs)]
        if self.pooling is Pooling.MEAN:
            pooled /= lengths[: len(inputs), None].astype(np.float32)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        unit: Vectors = pooled / np.maximum(norms, np.float32(1e-12))
        return unit

    def close(self) -> None:
        """Free the context; waits for a group being decoded in another thread."""
        with self._lock:
            if self._batch is not None:
                llama_cpp.llama_batch_free(self._batch)
                self._batch = None
            if self._ctx:
                llama_cpp.llama_free(self._ctx)
                self._ctx = None

    def _decode(
        self,
        tokens: npt.NDArray[np.int32],
        positions: npt.NDArray[np.int32],
        seq_ids: npt.NDArray[np.int32],
    ) -> Vectors:
        """Decode one chunk; return its per-token embeddings (a copy, one row per token)."""
        num_tokens = len(tokens)
        self._tokens[:num_tokens] = tokens
        self._positions[:num_tokens] = positions
        for slot, seq_id in zip(self._seq_ids, seq_ids.tolist(), strict=False):
            slot[0] = seq_id
        self._batch.n_tokens = num_tokens
        status = llama_cpp.llama_decode(self._ctx, self._batch)
        if status != 0:
            raise AiccError(f"llama_decode failed with status {status} while embedding")
        pointer = llama_cpp.llama_get_embeddings(self._ctx)
        if not pointer:
            raise AiccError("llama.cpp returned no embeddings")
        shape = (num_tokens, self.embedding_size)
        rows: Vectors = np.ctypeslib.as_array(pointer, shape=shape).copy()
        return rows

    def _pool(
        self,
        pooled: Vectors,
        rows: Vectors,
        seq_ids: npt.NDArray[np.int32],
        positions: npt.NDArray[np.int32],
        lengths: npt.NDArray[np.int64],
    ) -> None:
        """Fold one chunk's token rows into `pooled` (sums for MEAN, picked rows otherwise)."""
        if self.pooling is Pooling.MEAN:
            # Sequences are contiguous in the chunk: sum each run of rows at once.
            starts = np.flatnonzero(np.r_[True, seq_ids[1:] != seq_ids[:-1]])
            pooled[seq_ids[starts]] += np.add.reduceat(rows, starts, axis=0)
            return
        wanted = (
            positions == 0 if self.pooling is Pooling.CLS else positions == lengths[seq_ids] - 1
        )
        pooled[seq_ids[wanted]] = rows[wanted]


class EmbeddingManager:
    """The event-loop side: builds the `Embedder` on first use, queues requests on one lock
    (never more than one context), and runs each group in a worker thread."""

    def __init__(self, model: LlamaModel, config: EmbedderConfig, timeout_s: float) -> None:
        self.model = model
        self.config = config
        self.timeout_s = timeout_s
        self._embedder: Embedder | None = None
        self._is_closed = False
        # Held per group, not per request: a short request waits for one group of a long one.
        self._lock = asyncio.Lock()

    @property
    def embedding_size(self) -> int:
        return int(llama_cpp.llama_model_n_embd_out(self.model.model))

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One unit-length vector per input.

        Raises `InvalidRequestError` (no inputs, an empty input, ids outside the vocabulary),
        `ContextLengthExceededError` (an input longer than the context), `RequestTimeoutError`,
        `EngineUnavailableError` (shutting down), `ModelLoadError` (no context could be made).
        """
        self._check(inputs)
        vectors: list[list[float]] = [[] for _ in inputs]
        config = self.config
        lengths = [len(tokens) for tokens in inputs]
        groups = plan_groups(lengths, config.max_group_inputs, config.max_group_tokens)
        try:
            async with asyncio.timeout(self.timeout_s):
                for group in groups:
                    async with self._lock:
                        embedder = await self._require_embedder()
                        rows = await asyncio.to_thread(embedder.embed, [inputs[i] for i in group])
                    for index, row in zip(group, rows.tolist(), strict=True):
                        vectors[index] = row
        except TimeoutError:
            raise RequestTimeoutError(
                f"the embeddings request ran past {self.timeout_s:g}s and was stopped"
            ) from None
        return vectors

    async def close(self) -> None:
        """Free the context (waits for the group being decoded); later calls raise."""
        self._is_closed = True
        async with self._lock:  # queued groups now fail fast in `_require_embedder`
            embedder, self._embedder = self._embedder, None
            if embedder is not None:
                await asyncio.to_thread(embedder.close)

    async def _require_embedder(self) -> Embedder:
        if self._is_closed:
            raise EngineUnavailableError("the engine is shutting down")
        if self._embedder is None:
            self._embedder = await asyncio.to_thread(Embedder, self.model, self.config)
        return self._embedder

    def _check(self, inputs: list[list[int]]) -> None:
        if not inputs:
            raise InvalidRequestError("input must not be empty", param="input")
        vocab_size = self.model.num_vocab
        max_tokens = self.config.num_ctx
        for index, tokens in enumerate(inputs):
            if not tokens:
                raise InvalidRequestError(f"input[{index}] is empty", param="input")
            if len(tokens) > max_tokens:
                raise ContextLengthExceededError(
                    f"input[{index}] has {len(tokens)} tokens, but the embeddings context holds "
                    f"at most {max_tokens} tokens per input; shorten or split it",
                    param="input",
                )
            if min(tokens) < 0 or max(tokens) >= vocab_size:
                raise InvalidRequestError(
                    f"input[{index}]: token ids must lie in [0, {vocab_size})", param="input"
                )


def _layout(
    inputs: Sequence[Sequence[int]], pad_seq: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """Tokens, sequence ids and positions of a group, each input padded to whole row groups."""
    tokens: list[npt.NDArray[np.int32]] = []
    seq_ids: list[npt.NDArray[np.int32]] = []
    positions: list[npt.NDArray[np.int32]] = []
    num_padding = 0
    for seq_id, ids in enumerate(inputs):
        num_tokens, num_extra = len(ids), -len(ids) % ROW_ALIGN
        tokens += [np.asarray(ids, dtype=np.int32), np.zeros(num_extra, dtype=np.int32)]
        seq_ids += [np.full(num_tokens, seq_id, np.int32), np.full(num_extra, pad_seq, np.int32)]
        # The padding sequence's positions must keep increasing, as any sequence's.
        positions += [
            np.arange(num_tokens, dtype=np.int32),
            np.arange(num_padding, num_padding + num_extra, dtype=np.int32),
        ]
        num_padding += num_extra
    return np.concatenate(tokens), np.concatenate(seq_ids), np.concatenate(positions)


def _context_params(config: EmbedderConfig) -> llama_cpp.llama_context_params:
    params = llama_cpp.llama_context_default_params()
    # Room for the longest input and its padding, or for one call of short inputs.
    params.n_ctx = max(aligned(config.num_ctx), config.num_batch) + ROW_ALIGN
    params.n_batch = config.num_batch
    params.n_ubatch = config.num_batch
    params.n_seq_max = config.max_num_seqs
    params.n_threads = config.num_threads
    params.n_threads_batch = config.num_threads
    params.embeddings = True
    params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE  # we pool; see the module docstring
    # One pool shared by the group's sequences: a group may hold one input of num_ctx tokens.
    params.kv_unified = True
    params.no_perf = True
    return params
