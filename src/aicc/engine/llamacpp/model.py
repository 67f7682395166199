"""A loaded GGUF model and its llama.cpp context, through llama-cpp-python's low-level API."""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from aicc.engine.types import ModelInfo
from aicc.errors import AiccError, InvalidRequestError, ModelLoadError


@dataclass(frozen=True, slots=True)
class ContextConfig:
    """How to build the llama.cpp context."""

    num_ctx: int
    num_batch: int
    num_seq: int
    num_threads: int
    use_gpu: bool
    batch_invariant: bool
    """One KV stream per slot, so a sequence's cache layout never depends on the others."""
    num_prefix_slots: int = 0
    """Extra sequence ids (after the batch slots) holding shared and cached prefixes."""


class LlamaModel:
    """Owns `llama_model` + `llama_context`; tokenizes and renders tokens. Free with `close()`."""

    def __init__(self, path: Path, name: str, config: ContextConfig) -> None:
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        if config.use_gpu and not llama_cpp.llama_supports_gpu_offload():
            raise ModelLoadError(
                "--device cuda needs llama-cpp-python built with CUDA: reinstall it with "
                "CMAKE_ARGS='-DGGML_CUDA=on' pip install --force-reinstall --no-cache-dir "
                "llama-cpp-python==0.3.36, or use --device cpu"
            )
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 999 if config.use_gpu else 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not load model file {str(path)!r}")
        self.ctx = llama_cpp.llama_init_from_model(self.model, _context_params(config))
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise ModelLoadError(f"could not create a context for {str(path)!r}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.num_vocab: int = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.num_ctx: int = llama_cpp.llama_n_ctx(self.ctx)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self._pieces: dict[int, bytes] = {}
        self._special_pieces: dict[int, bytes] = {}
        # Scanned once at load (~0.3 s for a 262k vocabulary), never on the engine thread.
        self.eog_token_ids = tuple(t for t in range(self.num_vocab) if self.is_eog(t))
        self.info = self._read_info(path, name)

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    # -- tokens ----------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        data = text.encode("utf-8", errors="replace")
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), buffer, capacity, add_special, True
        )
        if count < 0:  # cannot happen with one token per byte, but never trust a bound
            capacity = -count
            buffer = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), buffer, capacity, add_special, True
            )
        return list(buffer[:count])

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, special tokens rendered as their text.

        Raises `InvalidRequestError` for ids outside the vocabulary (llama.cpp would abort the
        process on one).
        """
        if any(token < 0 or token >= self.num_vocab for token in token_ids):
            raise InvalidRequestError(
                f"token ids must lie in [0, {self.num_vocab})", param="tokens"
            )
        tokens = (llama_cpp.llama_token * len(token_ids))(*token_ids)
        capacity = 16 * len(token_ids) + 16
        for _ in range(2):
            buffer = ctypes.create_string_buffer(capacity)
            size = llama_cpp.llama_detokenize(
                self.vocab, tokens, len(token_ids), buffer, capacity, False, True
            )
            if size >= 0:
                return buffer.raw[:size].decode("utf-8", errors="replace")
            capacity = -size  # the size it needs
        raise AiccError("llama_detokenize kept asking for a larger buffer")

    def piece(self, token_id: int, *, special: bool = False) -> bytes:
        """The bytes a generated token stands for; control tokens render as nothing unless
        `special` (then as their text, e.g. `<｜tool▁calls▁begin｜>`)."""
        cache = self._special_pieces if special else self._pieces
        cached = cache.get(token_id)
        if cached is None:
            buffer = ctypes.create_string_buffer(64)
            size = llama_cpp.llama_token_to_piece(self.vocab, token_id, buffer, 64, 0, special)
            if size < 0:
                buffer = ctypes.create_string_buffer(-size)
                size = llama_cpp.llama_token_to_piece(
                    self.vocab, token_id, buffer, -size, 0, special
                )
            cached = buffer.raw[:size]
            cache[token_id] = cached
        return cached

    def raw_piece(self, token_id: int) -> bytes:
        """A token's bytes with special tokens spelled out (for logprobs and /tokenize)."""
        return self.piece(token_id, special=True)

    def is_eog(self, token_id: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token_id))

    # -- metadata --------------------------------------------------------------------------
    def metadata(self, key: str) -> str | None:
        buffer = ctypes.create_string_buffer(256)
        size = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buffer, 256)
        if size < 0:
            return None
        if size >= 256:
            buffer = ctypes.create_string_buffer(size + 1)
            llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buffer, size + 1)
        return buffer.value.decode("utf-8", errors="replace")

    def _token_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        text: bytes = llama_cpp.llama_vocab_get_text(self.vocab, token_id)
        return text.decode("utf-8", errors="replace")

    def _read_info(self, path: Path, name: str) -> ModelInfo:
        template = llama_cpp.llama_model_chat_template(self.model, None)
        num_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)
        num_ctx_seq = llama_cpp.llama_n_ctx_seq(self.ctx)
        max_context = min(num_ctx_seq, num_ctx_train) if num_ctx_train > 0 else num_ctx_seq
        return ModelInfo(
            name=name,
            path=str(path),
            architecture=self.metadata("general.architecture") or "unknown",
            max_context=max_context,
            vocab_size=self.num_vocab,
            chat_template=template.decode("utf-8", errors="replace") if template else None,
            bos_token=self._token_text(llama_cpp.llama_vocab_bos(self.vocab)),
            eos_token=self._token_text(llama_cpp.llama_vocab_eos(self.vocab)),
            general_name=self.metadata("general.name") or "",
        )


def _context_params(config: ContextConfig) -> llama_cpp.llama_context_params:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = config.num_ctx
    params.n_batch = config.num_batch
    params.n_ubatch = config.num_batch
    params.n_seq_max = config.num_seq + config.num_prefix_slots
    params.n_threads = config.num_threads
    params.n_threads_batch = config.num_threads
    # Default: one KV pool shared by all sequences; any sequence may use the whole context and
    # the scheduler's budget is the pool's size. Batch-invariant mode gives each slot a KV stream
    # of its own (ctx / n_seq cells), so a sequence's attention never sees another's cell layout.
    params.kv_unified = not config.batch_invariant
    params.no_perf = True
    return params
