"""Greedy generation through the real engine (`LlamaCppEngine`), for the model-store tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aicc.engine.llamacpp.client import LlamaCppConfig, LlamaCppEngine
from aicc.engine.llamacpp.model import ContextConfig
from aicc.engine.types import GenerationRequest, SamplingParams

PROMPT = "The three primary colours are"


def greedy_tokens(path: Path, *, num_tokens: int = 16) -> list[int]:
    """Start an engine on `path`, generate `num_tokens` greedy tokens, shut it down."""
    return asyncio.run(_generate(path, num_tokens))


async def _generate(path: Path, num_tokens: int) -> list[int]:
    context = ContextConfig(
        num_ctx=256, num_batch=64, num_seq=1, num_threads=1, use_gpu=False, batch_invariant=False
    )
    engine = LlamaCppEngine(
        LlamaCppConfig(path, "test", context, max_queue=1, request_timeout_s=60, retry_after_s=1)
    )
    await engine.start()
    try:
        prompt = tuple(engine.tokenize(PROMPT, add_special=True))
        params = SamplingParams(temperature=0.0, max_tokens=num_tokens, logprobs=0, ignore_eos=True)
        tokens: list[int] = []
        async for event in engine.generate(GenerationRequest("greedy", prompt, params)):
            tokens.extend(logprob.token_id for logprob in event.logprobs)
        return tokens
    finally:
        await engine.shutdown()
