"""Engines by name. The gateway asks for one here and never imports an implementation."""

from __future__ import annotations

from pathlib import Path

from aicc.config import Settings
from aicc.engine.interface import EngineClient


def create_engine(settings: Settings, model_path: Path, model_name: str) -> EngineClient:
    """Build the engine that `settings` selects (llama.cpp for GGUF files; vLLM comes later)."""
    # Imported here so that a gateway without llama.cpp installed can still start other engines.
    from aicc.engine.llamacpp.client import LlamaCppConfig, LlamaCppEngine
    from aicc.engine.llamacpp.model import ContextConfig

    context = ContextConfig(
        num_ctx=settings.ctx_size,
        num_batch=settings.max_batch_tokens,
        num_seq=settings.max_batch_size,
        num_threads=settings.threads,
        use_gpu=settings.device == "cuda",
        batch_invariant=settings.batch_invariant,
        num_prefix_slots=settings.num_prefix_slots,
    )
    return LlamaCppEngine(
        LlamaCppConfig(
            model_path=model_path,
            model_name=model_name,
            context=context,
            max_queue=settings.max_queue,
            request_timeout_s=settings.request_timeout_s,
            retry_after_s=settings.retry_after_s,
            embedding_ctx_size=settings.embedding_ctx_size,
            prefix_caching=settings.prefix_cache and settings.prefix_cache_entries > 0,
            prefix_shared_across_scopes=settings.prefix_cache_scope == "global",
        )
    )
