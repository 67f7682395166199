"""Perplexity of a text under a GGUF model: llama.cpp logits over sliding windows."""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from aicc.engine.llamacpp.model import ContextConfig, LlamaModel
from aicc.errors import AiccError, InvalidRequestError

MAX_BATCH_TOKENS = 64
"""Tokens per `llama_decode`: each scored position costs a vocabulary-sized logits row
(64 x 262k floats = 64 MiB for Gemma 3)."""


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    ppl: float
    """exp(mean negative log-likelihood of the scored tokens)."""
    tokens: int
    """Tokens scored (every token of the text but the first)."""
    windows: int
    """Context windows evaluated."""


def perplexity(
    model_path: Path,
    text: str,
    *,
    ctx: int = 512,
    stride: int = 256,
    threads: int | None = None,
    use_gpu: bool = False,
) -> PerplexityResult:
    """Score every token of `text` once, each with up to `ctx` tokens of context.

    Windows of `ctx` tokens start every `stride` tokens; a window scores only the tokens no
    earlier window scored, so each is predicted from at least `ctx - stride` tokens before it
    (except in the first window). As in llama.cpp's perplexity tool, a window that does not
    start the text begins with BOS when the model expects one.

    Raises InvalidRequestError for bad `ctx`/`stride` or a text under two tokens, and
    ModelLoadError when llama.cpp cannot load the model.
    """
    if ctx < 2:
        raise InvalidRequestError(f"ctx must be at least 2, not {ctx}", param="ctx")
    if not 1 <= stride <= ctx - 1:
        raise InvalidRequestError(f"stride must lie in [1, ctx - 1], not {stride}", param="stride")
    config = ContextConfig(
        num_ctx=ctx,
        num_batch=MAX_BATCH_TOKENS,
        num_seq=1,
        num_threads=threads or os.cpu_count() or 1,
        use_gpu=use_gpu,
        batch_invariant=False,
    )
    model = LlamaModel(model_path, model_path.name, config)
    try:
        if ctx > model.info.max_context:
            raise InvalidRequestError(
                f"ctx {ctx} exceeds the model's context of {model.info.max_context} tokens",
                param="ctx",
            )
        tokens = model.tokenize(text, add_special=True)
        if len(tokens) < 2:
            raise InvalidRequestError("the text is too short: it needs at least two tokens")
        scorer = _WindowScorer(model)
        try:
            return _slide(scorer, tokens, ctx, stride)
        finally:
            scorer.close()
    finally:
        model.close()


def _slide(scorer: _WindowScorer, tokens: list[int], ctx: int, stride: int) -> PerplexityResult:
    bos = llama_cpp.llama_vocab_bos(scorer.model.vocab)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(scorer.model.vocab)) and bos >= 0
    total_nll = 0.0
    num_scored = 0
    num_windows = 0
    scored_until = 1  # the first token is never predicted
    begin = 0
    while True:
        end = min(begin + ctx, len(tokens))
        window = tokens[begin:end]
        if begin > 0 and add_bos:
            window[0] = bos
        first_target = max(scored_until, begin + 1)
        nll, count = scorer.score(window, first_target - begin)
        total_nll += nll
        num_scored += count
        num_windows += 1
        scored_until = end
        if end == len(tokens):
            break
        begin += stride
    return PerplexityResult(math.exp(total_nll / num_scored), num_scored, num_windows)


class _WindowScorer:
    """Decodes one window at a time on sequence 0 and sums the NLL of its targets."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self._batch = llama_cpp.llama_batch_init(MAX_BATCH_TOKENS, 0, 1)
        self._tokens = _view(self._batch.token, ctypes.c_int32)
        self._positions = _view(self._batch.pos, ctypes.c_int32)
        self._flags = _view(self._batch.logits, ctypes.c_int8)
        _view(self._batch.n_seq_id, ctypes.c_int32)[:] = [1] * MAX_BATCH_TOKENS
        for i in range(MAX_BATCH_TOKENS):
            self._batch.seq_id[i][0] = 0

    def score(self, window: Sequence[int], first_target: int) -> tuple[float, int]:
        """(sum of -log p(window[t] | window[:t]) for t >= first_target, number of t)."""
        llama_cpp.llama_memory_clear(self.model.memory, True)
        total = 0.0
        count = 0
        for start in range(0, len(window), MAX_BATCH_TOKENS):
            end = min(start + MAX_BATCH_TOKENS, len(window))
            num = end - start
            self._tokens[:num] = window[start:end]
            self._positions[:num] = range(start, end)
            # Position p predicts window[p + 1]: logits are needed for p in
            # [first_target - 1, len(window) - 1).
            outputs = [p for p in range(start, end) if first_target - 1 <= p < len(window) - 1]
            self._flags[:num] = bytes(num)
            for p in outputs:
                self._flags[p - start] = 1
            self._batch.n_tokens = num
            status = llama_cpp.llama_decode(self.model.ctx, self._batch)
            if status != 0:
                raise AiccError(f"llama_decode failed with status {status}")
            if outputs:
                targets = np.array([window[p + 1] for p in outputs], dtype=np.int64)
                total += self._nll(len(outputs), targets)
                count += len(outputs)
        return total, count

    def _nll(self, num_rows: int, targets: np.ndarray[Any, np.dtype[np.int64]]) -> float:
        pointer = llama_cpp.llama_get_logits(self.model.ctx)
        logits = np.ctypeslib.as_array(pointer, shape=(num_rows, self.model.num_vocab))
        peak = logits.max(axis=1)
        sums = np.exp(logits - peak[:, None]).sum(axis=1, dtype=np.float64)
        log_z = peak.astype(np.float64) + np.log(sums)
        chosen = logits[np.arange(num_rows), targets].astype(np.float64)
        return float((log_z - chosen).sum())

    def close(self) -> None:
        llama_cpp.llama_batch_free(self._batch)


def _view(pointer: Any, ctype: Any) -> Any:
    """A sliceable ctypes array over a batch field."""
    return (ctype * MAX_BATCH_TOKENS).from_address(ctypes.addressof(pointer.contents))
