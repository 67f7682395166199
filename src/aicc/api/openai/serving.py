"""Turns OpenAI request bodies into engine requests, and engine events into choices.

Chat-specific work (templates, tools, reasoning, response formats) lives in `chat.py`; this
module holds what chat and text completions share, and the text-completion responses.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from aicc.api.openai.logprobs import completion_logprobs
from aicc.api.openai.protocol import CompletionRequest, SamplingBody
from aicc.api.record import CallRecord
from aicc.engine.interface import EngineClient
from aicc.engine.types import (
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from aicc.errors import AiccError, InvalidRequestError, ModelNotFoundError

Json = dict[str, Any]
T = TypeVar("T")


class UsageRecorder(Protocol):
    """Receives a request's real token counts once its events end (quotas, metering)."""

    def record(self, num_prompt_tokens: int, num_completion_tokens: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Metering:
    """Where a generation's facts go: the quota lease and the call's record."""

    usage: UsageRecorder | None = None
    record: CallRecord | None = None
    capture_content: bool = False


@dataclass(frozen=True, slots=True)
class ServingLimits:
    max_stop_strings: int
    max_n: int


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A validated request, already handed to the engine."""

    response_id: str
    created: int
    events: AsyncIterator[TokenEvent]
    include_usage: bool
    num_choices: int = 1
    wants_logprobs: bool = False


@dataclass(slots=True)
class ChoiceResult:
    """One choice of a generation collected in full (the non-streaming answer)."""

    index: int
    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_generated_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.texts)


@dataclass(frozen=True, slots=True)
class Collected:
    choices: list[ChoiceResult]
    num_prompt_tokens: int

    @property
    def usage(self) -> Json:
        generated = sum(choice.num_generated_tokens for choice in self.choices)
        return usage_json(self.num_prompt_tokens, generated)


class OpenAIServing:
    """What chat and text completions share: validation, sampling parameters, envelopes."""

    def __init__(
        self,
        engine: EngineClient,
        served_name: str,
        limits: ServingLimits,
        aliases: frozenset[str] = frozenset(),
    ) -> None:
        """`aliases`: other names requests may use (a registered `name` for `name:latest`)."""
        self.engine = engine
        self.served_name = served_name
        self.names = aliases | {served_name}
        self.limits = limits
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

    # -- text completions ------------------------------------------------------------------
    async def start_completion(
        self, body: CompletionRequest, scope: str, metering: Metering | None = None
    ) -> PreparedRequest:
        self.check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], int):
            token_ids = [int(token) for token in prompt]
            self._check_token_ids(token_ids)
        else:
            text = prompt if isinstance(prompt, str) else str(prompt[0])
            token_ids = await off_loop_if_large(len(text), self._tokenize_with_bos, text)
        params = self.sampling_params(body, body.max_tokens, num_top_logprobs=body.logprobs)
        return self.start("cmpl", body, token_ids, params, scope, metering)

    def completion_response(self, prepared: PreparedRequest, collected: Collected) -> Json:
        choices = [
            {
                "index": choice.index,
                "text": choice.text,
                "logprobs": (
                    completion_logprobs(choice.logprobs) if prepared.wants_logprobs else None
                ),
                "finish_reason": finish_reason_json(choice.finish_reason),
            }
            for choice in collected.choices
        ]
        return self.envelope(prepared, "text_completion", choices, collected.usage)

    async def completion_chunks(self, prepared: PreparedRequest) -> AsyncIterator[list[Json]]:
        """The stream's chunks; those ready together in one list (they leave in one write)."""
        offsets = [0] * prepared.num_choices
        async for event, usage in self.stream_events(prepared):
            choice = None
            if event is not None and (event.text or event.finish_reason or event.logprobs):
                logprobs = None
                if prepared.wants_logprobs:
                    logprobs = completion_logprobs(event.logprobs, offsets[event.index])
                    offsets[event.index] += sum(len(t) for t in logprobs["tokens"])
                choice = {
                    "index": event.index,
                    "text": event.text,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason_json(event.finish_reason),
                }
            if ready := self.ready_chunks(prepared, "text_completion", choice, usage):
                yield ready

    def _tokenize_with_bos(self, text: str) -> list[int]:
        return self.engine.tokenize(text, add_special=True)

    # -- shared ----------------------------------------------------------------------------
    def start(
        self,
        prefix: str,
        body: SamplingBody,
        token_ids: list[int],
        params: SamplingParams,
        scope: str,
        metering: Metering | None = None,
    ) -> PreparedRequest:
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        request = GenerationRequest(response_id, tuple(token_ids), params, cache_scope=scope)
        events = self.engine.generate(request)
        if metering is not None:
            events = _metered(events, params.n, metering)
        return PreparedRequest(
            response_id,
            int(time.time()),
            events,
            body.include_usage,
            num_choices=params.n,
            wants_logprobs=params.logprobs is not None,
        )

    async def collect(self, prepared: PreparedRequest) -> Collected:
        """Wait for every choice to finish."""
        choices = [ChoiceResult(index) for index in range(prepared.num_choices)]
        num_prompt = 0
        try:
            async for event in prepared.events:
                choice = choices[event.index]
                choice.texts.append(event.text)
                choice.logprobs.extend(event.logprobs)
                choice.num_generated_tokens = event.num_generated_tokens
                choice.finish_reason = event.finish_reason
                num_prompt = event.num_prompt_tokens
        finally:
            await close_events(prepared.events)
        if any(choice.finish_reason is None for choice in choices):
            raise AiccError("the engine ended the stream without a finish reason")
        return Collected(choices, num_prompt)

    async def stream_events(
        self, prepared: PreparedRequest
    ) -> AsyncIterator[tuple[TokenEvent | None, Json | None]]:
        """The request's events, each as (event, None). If usage was asked for, it comes with
        the event that finishes the last choice, as (event, usage): the stream's last chunk
        and its usage then leave in one write (a relaying gateway reads them as one, and
        starts its audit commit before passing the last chunk on). Events that end otherwise
        are followed by (None, usage)."""
        generated = [0] * prepared.num_choices
        unfinished = set(range(prepared.num_choices))
        num_prompt = 0
        is_usage_due = prepared.include_usage
        try:
            async for event in prepared.events:
                generated[event.index] = event.num_generated_tokens
                num_prompt = event.num_prompt_tokens
                if event.finish_reason is not None:
                    unfinished.discard(event.index)
                usage = None
                if is_usage_due and not unfinished:
                    usage, is_usage_due = usage_json(num_prompt, sum(generated)), False
                yield event, usage
        finally:
            await close_events(prepared.events)
        if is_usage_due:
            yield None, usage_json(num_prompt, sum(generated))

    def ready_chunks(
        self, prepared: PreparedRequest, kind: str, choice: Json | None, usage: Json | None
    ) -> list[Json]:
        """The chunks of one step of a stream, to send together: the choice's (if any), then
        the usage-only chunk (if the usage came with it)."""
        ready = [] if choice is None else [self.chunk(prepared, kind, choice)]
        if usage is not None:
            ready.append(self.chunk(prepared, kind, None, usage))
        return ready

    def chunk(
        self, prepared: PreparedRequest, kind: str, choice: Json | None, usage: Json | None = None
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

    def envelope(
        self, prepared: PreparedRequest, kind: str, choices: list[Json], usage: Json
    ) -> Json:
        return {
            "id": prepared.response_id,
            "object": kind,
            "created": prepared.created,
            "model": self.served_name,
            "system_fingerprint": self.system_fingerprint,
            "choices": choices,
            "usage": usage,
        }

    def check_model(self, name: str) -> None:
        if name not in self.names:
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

    def sampling_params(
        self,
        body: SamplingBody,
        max_tokens: int | None,
        *,
        num_top_logprobs: int | None = None,
        grammar: str | None = None,
        render_special: bool = False,
    ) -> SamplingParams:
        stop = body.stop_strings
        if len(stop) > self.limits.max_stop_strings:
            raise InvalidRequestError(
                f"at most {self.limits.max_stop_strings} stop strings are allowed, got {len(stop)}",
                param="stop",
            )
        if body.n > self.limits.max_n:
            raise InvalidRequestError(
                f"n must be at most {self.limits.max_n} on this server, got {body.n}", param="n"
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
            n=body.n,
            logprobs=num_top_logprobs,
            grammar=grammar,
            render_special=render_special,
        )


_LARGE_INPUT_SIZE = 16384
"""Inputs larger than this (characters, or token ids) are tokenized, rendered or detokenized in
a worker thread (milliseconds of work that must not stall every other stream on the loop)."""


async def off_loop_if_large(size: int, work: Callable[..., T], *args: Any) -> T:
    if size > _LARGE_INPUT_SIZE:
        return await asyncio.to_thread(work, *args)
    return work(*args)


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


def finish_reason_json(reason: FinishReason | None) -> str | None:
    if reason is None:
        return None
    # An aborted request never reaches a client that is still listening; "stop" is safest.
    return "length" if reason is FinishReason.LENGTH else "stop"


def usage_json(num_prompt: int, num_generated: int) -> Json:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_generated,
        "total_tokens": num_prompt + num_generated,
    }


async def _metered(
    events: AsyncIterator[TokenEvent], num_choices: int, metering: Metering
) -> AsyncIterator[TokenEvent]:
    """`events`, reporting tokens, timings and the finish reason when they end — also when the
    client went away (the tokens were spent all the same)."""
    generated = [0] * num_choices
    num_prompt = 0
    record = metering.record
    try:
        async for event in events:
            generated[event.index] = event.num_generated_tokens
            num_prompt = event.num_prompt_tokens
            if record is not None:
                _note_event(record, event, metering.capture_content)
            yield event
    finally:
        await close_events(events)
        if record is not None:
            record.num_prompt_tokens = num_prompt
            record.num_completion_tokens = sum(generated)
        if metering.usage is not None:
            metering.usage.record(num_prompt, sum(generated))


def _note_event(record: CallRecord, event: TokenEvent, capture_content: bool) -> None:
    if event.num_generated_tokens > 0:
        now = time.perf_counter()
        if record.first_token_at is None:
            record.first_token_at = now
        record.last_token_at = now
    if record.queue_time_s is None and event.queue_time_s is not None:
        record.queue_time_s = event.queue_time_s
    if event.index == 0:  # the first choice speaks for the call
        if event.finish_reason is not None:
            record.finish_reason = finish_reason_json(event.finish_reason)
        if capture_content and event.text:
            record.completion_text.append(event.text)


async def close_events(events: AsyncIterator[TokenEvent]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()
