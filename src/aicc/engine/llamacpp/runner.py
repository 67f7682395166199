"""Feeds one scheduler step to `llama_decode` as a single multi-sequence batch."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import llama_cpp

from aicc.engine.llamacpp.model import LlamaModel
from aicc.engine.prefix_cache import KvCopy, KvOp
from aicc.engine.scheduler import ScheduledChunk


class KvCacheFullError(Exception):
    """llama.cpp found no KV slot for the batch; the caller should shrink it and retry."""


class DecodeError(Exception):
    """llama_decode failed for a reason retrying cannot fix."""


class BatchRunner:
    """Owns one reusable `llama_batch` sized for the largest step."""

    def __init__(self, model: LlamaModel, max_batch_tokens: int) -> None:
        self._model = model
        self._capacity = max_batch_tokens
        self._batch = llama_cpp.llama_batch_init(max_batch_tokens, 0, 1)
        # Views of the batch's C arrays that accept slice assignment.
        self._tokens = _view(self._batch.token, ctypes.c_int32, max_batch_tokens)
        self._positions = _view(self._batch.pos, ctypes.c_int32, max_batch_tokens)
        self._logits = _view(self._batch.logits, ctypes.c_int8, max_batch_tokens)
        _view(self._batch.n_seq_id, ctypes.c_int32, max_batch_tokens)[:] = [1] * max_batch_tokens
        self._seq_ids = [self._batch.seq_id[i] for i in range(max_batch_tokens)]

    def decode(self, chunks: Sequence[ScheduledChunk]) -> list[int]:
        """Decode all chunks in one call; returns, per chunk, the batch index of its logits
        (-1 for a chunk that needs none). Raises `KvCacheFullError` or `DecodeError`."""
        total = sum(chunk.num_tokens for chunk in chunks)
        if total > self._capacity:
            raise DecodeError(f"step of {total} tokens exceeds the batch of {self._capacity}")
        num_tokens = 0
        logit_indices = []
        for chunk in chunks:
            end = num_tokens + chunk.num_tokens
            self._tokens[num_tokens:end] = chunk.token_ids
            self._positions[num_tokens:end] = range(chunk.start, chunk.start + chunk.num_tokens)
            self._logits[num_tokens:end] = bytes(chunk.num_tokens)
            slot = chunk.seq.slot
            for seq_id in self._seq_ids[num_tokens:end]:
                seq_id[0] = slot
            if chunk.needs_logits:
                self._logits[end - 1] = 1
                logit_indices.append(end - 1)
            else:
                logit_indices.append(-1)
            num_tokens = end
        self._batch.n_tokens = num_tokens
        status = llama_cpp.llama_decode(self._model.ctx, self._batch)
        if status == 1:
            raise KvCacheFullError("no KV cache slot for this batch")
        if status != 0:
            raise DecodeError(f"llama_decode failed with status {status}")
        return logit_indices

    def apply(self, ops: Sequence[KvOp]) -> None:
        """Carry out the scheduler's KV changes, in order."""
        memory = self._model.memory
        for op in ops:
            if isinstance(op, KvCopy):
                llama_cpp.llama_memory_seq_cp(memory, op.src, op.dst, 0, op.num_tokens)
            else:
                llama_cpp.llama_memory_seq_rm(memory, op.seq_id, -1, -1)

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None


def _view(pointer: Any, ctype: Any, length: int) -> Any:
    """A ctypes array over the memory `pointer` points to (ctypes pointers cannot be sliced)."""
    return (ctype * length).from_address(ctypes.addressof(pointer.contents))
