"""Turns one choice's generated text into OpenAI chat output: reasoning, content, tool calls.

Streamed and non-streamed responses run the same `ChatOutputProcessor`; a non-streamed message
is just `message_json` of all the deltas, so both always agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aicc.engine.reasoning import ReasoningSplitter
from aicc.engine.toolcalls import ToolCall, ToolCallParser


@dataclass(frozen=True, slots=True)
class ChatDelta:
    """What one push released for one choice."""

    reasoning_content: str = ""
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.reasoning_content or self.content or self.tool_calls)


class ChatOutputProcessor:
    """Splits reasoning off first (`reasoning`), then parses tool calls from the content only:
    a `<tool_call>` inside `<think>` is part of the model's thinking, not a call."""

    def __init__(
        self, reasoning: bool, starts_in_reasoning: bool, tool_parser: ToolCallParser | None
    ) -> None:
        self._splitter = ReasoningSplitter(starts_in_reasoning) if reasoning else None
        self._tool_parser = tool_parser
        self.has_tool_calls = False
        """True once a call was emitted: the finish_reason must then be "tool_calls"."""

    def push(self, text: str) -> ChatDelta:
        """Add generated text; return what is now safe to send."""
        reasoning, content = self._splitter.push(text) if self._splitter else ("", text)
        return self._parse(reasoning, content, is_final=False)

    def finish(self) -> ChatDelta:
        """The generation ended: release everything still held."""
        reasoning, content = self._splitter.flush() if self._splitter else ("", "")
        return self._parse(reasoning, content, is_final=True)

    def _parse(self, reasoning: str, content: str, *, is_final: bool) -> ChatDelta:
        if self._tool_parser is None:
            return ChatDelta(reasoning, content)
        parsed = self._tool_parser.push(content)
        tool_calls = parsed.tool_calls
        content = parsed.content
        if is_final:
            rest = self._tool_parser.flush()
            content += rest.content
            tool_calls += rest.tool_calls
        self.has_tool_calls = self.has_tool_calls or bool(tool_calls)
        return ChatDelta(reasoning, content, tool_calls)


def delta_json(delta: ChatDelta) -> dict[str, Any]:
    """OpenAI's streamed `delta` object; empty fields are left out."""
    out: dict[str, Any] = {}
    if delta.reasoning_content:
        out["reasoning_content"] = delta.reasoning_content
    if delta.content:
        out["content"] = delta.content
    if delta.tool_calls:
        out["tool_calls"] = [_tool_call_json(call, with_index=True) for call in delta.tool_calls]
    return out


def message_json(all_deltas: Iterable[ChatDelta]) -> dict[str, Any]:
    """OpenAI's non-streamed `message`: `content` is None when the reply is only tool calls."""
    deltas = list(all_deltas)
    reasoning = "".join(d.reasoning_content for d in deltas)
    content = "".join(d.content for d in deltas)
    tool_calls = [call for d in deltas for call in d.tool_calls]
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if tool_calls and not content else content,
    }
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = [_tool_call_json(call, with_index=False) for call in tool_calls]
    return message


def _tool_call_json(call: ToolCall, *, with_index: bool) -> dict[str, Any]:
    # Streamed calls carry `index` so clients can merge fragments; a message's calls do not.
    out: dict[str, Any] = {"index": call.index} if with_index else {}
    out |= {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    return out
