"""Reading an upstream's OpenAI answer: SSE event framing and what the gateway measures.

Events are passed on byte for byte; only their `data` is parsed, to learn the token counts,
the finish reason and the token times that the metrics and the audit record need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE_END = re.compile(r"\r\n|\n|\r")
DONE_DATA = "[DONE]"


class SseFramingError(ValueError):
    """The byte stream is not server-sent events (an event grew past the limit)."""


class SseFramer:
    """Splits a byte stream into whole events, each with its blank-line terminator."""

    def __init__(self, max_event_bytes: int = 1024 * 1024) -> None:
        self.max_event_bytes = max_event_bytes
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The events `data` completes. Raises `SseFramingError` past `max_event_bytes`."""
        buffer = self._buffer + data
        events = []
        start = 0
        for match in _EVENT_END.finditer(buffer):
            events.append(buffer[start : match.end()])
            start = match.end()
        self._buffer = buffer[start:]
        if len(self._buffer) > self.max_event_bytes:
            raise SseFramingError(f"an event is longer than {self.max_event_bytes} bytes")
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet complete."""
        return self._buffer


def event_data(event: bytes) -> str | None:
    """The event's `data` (several data lines joined by newlines); None without any.

    Raises `UnicodeDecodeError` for bytes that are not UTF-8.
    """
    lines = []
    for line in _LINE_END.split(event.decode()):
        if line == "data" or line.startswith("data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(" ") else value)
    return "\n".join(lines) if lines else None


@dataclass(slots=True)
class StreamFacts:
    """What the gateway learned from an upstream answer (times from `time.perf_counter`)."""

    first_token_at: float | None = None
    """When the first event carrying generated output arrived (streams only)."""
    last_token_at: float | None = None
    num_prompt_tokens: int | None = None
    num_completion_tokens: int | None = None
    """From the upstream's `usage`; None when it reported none."""
    finish_reason: str | None = None
    """The first choice's finish reason."""
    error_code: str | None = None
    """The code (or type) of an error event inside a stream."""
    is_done: bool = False
    """`data: [DONE]` was seen."""
    has_final_usage: bool = False
    """The usage-only chunk was seen: OpenAI's last data chunk, all counts are known."""

    def observe_chunk(self, payload: dict[str, Any], at: float) -> bool:
        """Learn from one streamed chunk. True when the chunk only carries `usage`."""
        self._observe_usage(payload)
        self._observe_error(payload)
        choices = payload.get("choices")
        if not isinstance(choices, list):
            return False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if _has_output(choice):
                if self.first_token_at is None:
                    self.first_token_at = at
                self.last_token_at = at
            self._observe_finish(choice)
        is_usage_only = not choices and isinstance(payload.get("usage"), dict)
        if is_usage_only:
            self.has_final_usage = True
        return is_usage_only

    def observe_body(self, payload: dict[str, Any]) -> None:
        """Learn from a whole (non-streamed) answer."""
        self._observe_usage(payload)
        choices = payload.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    self._observe_finish(choice)

    def _observe_usage(self, payload: dict[str, Any]) -> None:
        usage = payload.get("usage")
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if _is_count(prompt):
            self.num_prompt_tokens = prompt
        if _is_count(completion):
            self.num_completion_tokens = completion
        elif _is_count(prompt) and "total_tokens" in usage:
            self.num_completion_tokens = 0  # embeddings report prompt and total tokens only

    def _observe_error(self, payload: dict[str, Any]) -> None:
        error = payload.get("error")
        if isinstance(error, dict):
            code = error.get("code") or error.get("type") or "upstream_error"
            self.error_code = str(code)

    def _observe_finish(self, choice: dict[str, Any]) -> None:
        reason = choice.get("finish_reason")
        if isinstance(reason, str) and choice.get("index", 0) == 0 and self.finish_reason is None:
            self.finish_reason = reason


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _has_output(choice: dict[str, Any]) -> bool:
    """A chat delta with content, reasoning or tool calls, or a completion's text."""
    if choice.get("text"):
        return True
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return False
    return any(value for key, value in delta.items() if key != "role")
