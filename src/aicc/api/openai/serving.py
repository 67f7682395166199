"""Turns OpenAI request bodies into engine requests and engine events into OpenAI responses."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aicc.api.openai.protocol import ChatCompletionRequest, CompletionRequest, SamplingBody
from aicc.engine.chat import ChatRenderer
from aicc.engine.interface import EngineClient
from aicc.engine.types import FinishReason, GenerationRequest, SamplingParams, TokenEvent
from aicc.errors import AiccError, InvalidRequestError, ModelNotFoundError

Json = dict[str, Any]
ReceiveDisconnect = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Completion:
    """A generation collected in full (the non-streaming answer)."""

    text: str
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_generated_tokens: int


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A validated request, already handed to the engine."""

    response_id: str
    created: int
    events: AsyncIterator[TokenEvent]
    include_usage: bool


class OpenAIServing:
    """The OpenAI API's logic, independent of HTTP plumbing."""

    def __init__(self, engine: EngineClient, served_name: str, max_stop_strings: int) -> None:
        self.engine = engine
        self.served_name = served_name
        self.max_stop_strings = max_stop_strings
        self.renderer = ChatRenderer(engine.model_info)
        self.created = int(time.time())
        self.system_fingerprint = (
            "fp_"
            + hashlib.sha256(f"{engine.model_info.path}:{served_name}".encode()).hexdigest()[:10]
        )

    def model_card(self) -> Json:
        info = self.engine.model_info
        return {
            "id": self.served_name,
            "object": "model",
            "created": self.created,
            "owned_by": "aicc",
            "max_model_len": info.max_context,
        }

    # -- requests --------------------------------------------------------------------------
    async def start_chat(self, body: ChatCompletionRequest) -> PreparedRequest:
        self._check_model(body.model)
        messages = [_chat_message(message.role, message.text) for message in body.messages]
        size = sum(len(message["content"]) for message in messages)
        token_ids = await _off_loop_if_large(size, self._render_and_tokenize, messages)
        return self._start("chatcmpl", body, token_ids, body.completion_limit)

    async def start_completion(self, body: CompletionRequest) -> PreparedRequest:
        self._check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], int):
            token_ids = [int(token) for token in prompt]
            self._check_token_ids(token_ids)
        else:
            text = prompt if isinstance(prompt, str) else str(prompt[0])
            token_ids = await _off_loop_if_large(len(text), self._tokenize_with_bos, text)
        return self._start("cmpl", body, token_ids, body.max_tokens)

    def _render_and_tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        # The template writes the BOS token itself.
        return self.engine.tokenize(self.renderer.render(messages), add_special=False)

    def _tokenize_with_bos(self, text: str) -> list[int]:
        return self.engine.tokenize(text, add_special=True)

    def _start(
        self, prefix: str, body: SamplingBody, token_ids: list[int], max_tokens: int | None
    ) -> PreparedRequest:
        params = self._sampling_params(body, max_tokens)
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        events = self.engine.generate(GenerationRequest(response_id, tuple(token_ids), params))
        return PreparedRequest(response_id, int(time.time()), events, body.include_usage)

    # -- responses -------------------------------------------------------------------------
    async def collect(self, prepared: PreparedRequest) -> Completion:
        parts: list[str] = []
        event: TokenEvent | None = None
        try:
            async for event in prepared.events:
                parts.append(event.text)
        finally:
            await _close(prepared.events)
        if event is None or event.finish_reason is None:
            raise AiccError("the engine ended the stream without a finish reason")
        return Completion(
            "".join(parts), event.finish_reason, event.num_prompt_tokens, event.num_generated_tokens
        )

    def chat_response(self, prepared: PreparedRequest, completion: Completion) -> Json:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": completion.text},
            "logprobs": None,
            "finish_reason": _finish(completion.finish_reason),
        }
        return self._envelope(prepared, "chat.completion", choice, _usage(completion))

    def completion_response(self, prepared: PreparedRequest, completion: Completion) -> Json:
        choice = {
            "index": 0,
            "text": completion.text,
            "logprobs": None,
            "finish_reason": _finish(completion.finish_reason),
        }
        return self._envelope(prepared, "text_completion", choice, _usage(completion))

    async def chat_chunks(self, prepared: PreparedRequest) -> AsyncIterator[Json]:
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        yield self._chunk(prepared, "chat.completion.chunk", {**first, "finish_reason": None})
        async for choice, usage in self._choices(prepared, _chat_delta):
            yield self._chunk(prepared, "chat.completion.chunk", choice, usage)

    async def completion_chunks(self, prepared: PreparedRequest) -> AsyncIterator[Json]:
        async for choice, usage in self._choices(prepared, _text_delta):
            yield self._chunk(prepared, "text_completion", choice, usage)

    # -- helpers ---------------------------------------------------------------------------
    async def _choices(
        self, prepared: PreparedRequest, delta: Callable[[TokenEvent], Json]
    ) -> AsyncIterator[tuple[Json, Json | None]]:
        """One choice per event that carries text or a finish; a usage-only chunk at the end."""
        last: TokenEvent | None = None
        try:
            async for event in prepared.events:
                last = event
                if event.text or event.finish_reason is not None:
                    choice = {**delta(event), "index": 0, "logprobs": None}
                    choice["finish_reason"] = (
                        _finish(event.finish_reason) if event.finish_reason else None
                    )
                    yield choice, None
        finally:
            await _close(prepared.events)
        if prepared.include_usage and last is not None:
            yield (
                {},
                {
                    "prompt_tokens": last.num_prompt_tokens,
                    "completion_tokens": last.num_generated_tokens,
                    "total_tokens": last.num_prompt_tokens + last.num_generated_tokens,
                },
            )

    def _chunk(
        self, prepared: PreparedRequest, kind: str, choice: Json, usage: Json | None = None
    ) -> Json:
        chunk = {
            "id": prepared.response_id,
            "object": kind,
            "created": prepared.created,
            "model": self.served_name,
            "system_fingerprint": self.system_fingerprint,
            "choices": [choice] if choice else [],
        }
        if prepared.include_usage:
            chunk["usage"] = usage
        return chunk

    def _envelope(self, prepared: PreparedRequest, kind: str, choice: Json, usage: Json) -> Json:
        return {
            "id": prepared.response_id,
            "object": kind,
            "created": prepared.created,
            "model": self.served_name,
            "system_fingerprint": self.system_fingerprint,
            "choices": [choice],
            "usage": usage,
        }

    def _check_model(self, name: str) -> None:
        if name != self.served_name:
            raise ModelNotFoundError(
                f"The model {name!r} does not exist; this server serves {self.served_name!r}",
                param="model",
            )

    def _check_token_ids(self, token_ids: list[int]) -> None:
        vocab_size = self.engine.model_info.vocab_size
        if any(token < 0 or token >= vocab_size for token in token_ids):
            raise InvalidRequestError(
                f"prompt token ids must lie in [0, {vocab_size})", param="prompt"
            )

    def _sampling_params(self, body: SamplingBody, max_tokens: int | None) -> SamplingParams:
        stop = body.stop_strings
        if len(stop) > self.max_stop_strings:
            raise InvalidRequestError(
                f"at most {self.max_stop_strings} stop strings are allowed, got {len(stop)}",
                param="stop",
            )
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            seed=body.seed,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            max_tokens=max_tokens,
            stop=stop,
            logit_bias=_logit_bias(body.logit_bias, self.engine.model_info.vocab_size),
            ignore_eos=body.ignore_eos,
        )


_LARGE_PROMPT_CHARS = 16384
"""Prompts longer than this are rendered and tokenized in a worker thread (milliseconds of
work that must not stall every other stream on the event loop)."""


async def _off_loop_if_large(size: int, work: Callable[..., list[int]], *args: Any) -> list[int]:
    if size > _LARGE_PROMPT_CHARS:
        return await asyncio.to_thread(work, *args)
    return work(*args)


def _chat_message(role: str, text: str) -> dict[str, str]:
    # OpenAI's "developer" role is the newer name for "system".
    return {"role": "system" if role == "developer" else role, "content": text}


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    entries = []
    for key, value in bias.items():
        valid_key = key.isdigit() and int(key) < vocab_size
        if not valid_key or not -100.0 <= value <= 100.0:
            raise InvalidRequestError(
                f"logit_bias maps token ids in [0, {vocab_size}) to values in [-100, 100]; "
                f"got {key!r}: {value}",
                param="logit_bias",
            )
        entries.append((int(key), value))
    return tuple(entries)


def _finish(reason: FinishReason) -> str:
    # An aborted request never reaches a client that is still listening; "stop" is safest.
    return "length" if reason is FinishReason.LENGTH else "stop"


def _usage(completion: Completion) -> Json:
    return {
        "prompt_tokens": completion.num_prompt_tokens,
        "completion_tokens": completion.num_generated_tokens,
        "total_tokens": completion.num_prompt_tokens + completion.num_generated_tokens,
    }


def _chat_delta(event: TokenEvent) -> Json:
    return {"delta": {"content": event.text} if event.text else {}}


def _text_delta(event: TokenEvent) -> Json:
    return {"text": event.text}


async def _close(events: AsyncIterator[TokenEvent]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()
