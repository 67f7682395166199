"""Tool calls in generated text: their formats, and the streaming parser that turns them into
OpenAI `tool_calls` (the prompt that asks for them and the grammar spec that forces them are in
`aicc.engine.toolprompt`).

Two output formats:
- "hermes": `<tool_call>\\n{"name": "fn", "arguments": {...}}\\n</tool_call>`, one block per call
  (what `toolprompt.tool_system_prompt` teaches when a template does not render `tools` itself);
- "deepseek", as DeepSeek-V3/R1's chat template writes past calls:
  `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{ARGS}\\n```
  <｜tool▁call▁end｜>` (calls separated by a newline), then `<｜tool▁calls▁end｜>`; the V3.1 call
  body `NAME<｜tool▁sep｜>{ARGS}` is accepted too. The deepseek parser also accepts hermes blocks,
  because a forced call with a free choice of function is grammar-constrained in that shape
  (see `toolprompt.required_call_spec`).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any

from aicc.engine.reasoning import tag_prefix_len

FORMATS = ("hermes", "deepseek")

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>"
DS_SEP = "<｜tool▁sep｜>"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One complete, validated call, as OpenAI's `tool_calls[i]` needs it."""

    index: int
    """Position among this choice's calls, from 0."""
    id: str
    """`call_` + 24 hex digits."""
    name: str
    arguments: str
    """A JSON object, re-serialized compactly."""


@dataclass(frozen=True, slots=True)
class ParsedDelta:
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


class _State(Enum):
    CONTENT = auto()
    BLOCK = auto()
    """Inside a call block, waiting for its end tag."""
    SECTION = auto()
    """Deepseek: inside `<｜tool▁calls▁begin｜>`, between calls."""


class ToolCallParser:
    """Streams content through and turns complete tool-call blocks into `ToolCall`s.

    A call is emitted only when its block is complete, its arguments are a JSON object and its
    name is in `tool_names`; any other block goes to content as the raw text it was. Content
    streams out at once, except text that could still start a block and trailing whitespace
    (the whitespace next to a block is formatting and dropped; elsewhere it is released later).
    Raises `ValueError` for an unknown `fmt`.
    """

    def __init__(self, fmt: str, tool_names: set[str]) -> None:
        self._tool_names = frozenset(tool_names)
        self._open_tags = (
            (HERMES_OPEN,)
            if check_format(fmt) == "hermes"
            else (DS_CALLS_BEGIN, DS_CALL_BEGIN, HERMES_OPEN)
        )
        self._state = _State.CONTENT
        self._held = ""
        self._block_open = ""
        """The tag that opened the current block (kept to give back the raw text)."""
        self._in_section = False
        """Deepseek: the calls began with `<｜tool▁calls▁begin｜>` and have not ended."""
        self._section_raw = ""
        """That opener, until a call vouches for it or fails (then content, as raw text)."""
        self._section_has_call = False
        self._after_block = False
        self.num_calls = 0

    def push(self, text: str) -> ParsedDelta:
        """Add content text; return the content and calls now complete."""
        self._held += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while self._step(content, calls):
            pass
        return ParsedDelta("".join(content), tuple(calls))

    def flush(self) -> ParsedDelta:
        """The output ended: an unfinished block goes back to content as raw text."""
        held, self._held = self._held, ""
        if self._state is _State.BLOCK:
            held = self._section_raw + self._block_open + held
        elif self._state is _State.SECTION:
            held = self._section_raw + held if self._section_raw else held.strip()
        elif self._after_block:
            held = held.lstrip()
        self._state, self._section_raw, self._in_section = _State.CONTENT, "", False
        return ParsedDelta(held)

    def _step(self, content: list[str], calls: list[ToolCall]) -> bool:
        """Consume what the held text decides; True while progress was made."""
        if self._state is _State.CONTENT:
            return self._step_content(content)
        if self._state is _State.SECTION:
            return self._step_section(content)
        close = HERMES_CLOSE if self._block_open == HERMES_OPEN else DS_CALL_END
        end = self._held.find(close)
        if end < 0:
            return False
        body, self._held = self._held[:end], self._held[end + len(close) :]
        call = self._parse_block(body)
        if call is None:
            content.append(self._section_raw + self._block_open + body + close)
        else:
            calls.append(call)
            self._section_has_call = True
        self._section_raw = ""
        self._state = _State.SECTION if self._in_section else _State.CONTENT
        self._after_block = True
        return True

    def _step_content(self, content: list[str]) -> bool:
        if self._after_block:
            self._held = self._held.lstrip()
            if not self._held:
                return False
            self._after_block = False
        starts = [(i, tag) for tag in self._open_tags if (i := self._held.find(tag)) >= 0]
        if starts:
            start, tag = min(starts)
            content.append(self._held[:start].rstrip())
            self._held = self._held[start + len(tag) :]
            self._in_section = tag == DS_CALLS_BEGIN
            if self._in_section:
                self._section_raw, self._state = tag, _State.SECTION
                self._section_has_call = False
            else:
                self._block_open, self._state = tag, _State.BLOCK
            return True
        keep_from = len(self._held) - tag_prefix_len(self._held, self._open_tags)
        keep_from = len(self._held[:keep_from].rstrip())
        content.append(self._held[:keep_from])
        self._held = self._held[keep_from:]
        return False

    def _step_section(self, content: list[str]) -> bool:
        rest = self._held.lstrip()
        for tag in (DS_CALL_BEGIN, DS_CALLS_END):
            if rest.startswith(tag):
                self._held = rest[len(tag) :]
                if tag == DS_CALL_BEGIN:
                    self._block_open, self._state = tag, _State.BLOCK
                else:
                    content.append(self._section_raw + ("" if self._section_has_call else tag))
                    self._section_raw, self._state, self._after_block = "", _State.CONTENT, True
                    self._in_section = False
                return True
            if tag.startswith(rest):
                return False
        # Neither a call nor the section end: the section is over, this is content again.
        content.append(self._section_raw)
        self._section_raw, self._state, self._in_section = "", _State.CONTENT, False
        return True

    def _parse_block(self, body: str) -> ToolCall | None:
        if self._block_open == HERMES_OPEN:
            parsed = _loads(body)
            if not isinstance(parsed, dict):
                return None
            name = parsed.get("name")
            arguments = parsed.get("arguments", parsed.get("parameters"))
            if isinstance(arguments, str):
                arguments = _loads(arguments)
        else:
            name, arguments = _parse_deepseek_body(body)
        if not isinstance(name, str) or name not in self._tool_names:
            return None
        if not isinstance(arguments, dict):
            return None
        index, self.num_calls = self.num_calls, self.num_calls + 1
        compact = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
        return ToolCall(index, f"call_{secrets.token_hex(12)}", name, compact)


def _parse_deepseek_body(body: str) -> tuple[str | None, Any]:
    """(name, parsed arguments) of a V3 (`function<sep>NAME\\n```json…```) or V3.1
    (`NAME<sep>{…}`) call body; (None, None) when it is neither."""
    head, sep, tail = body.partition(DS_SEP)
    if not sep:
        return None, None
    if tail.lstrip().startswith("{"):
        return head.strip(), _loads(tail)
    name, _, fenced = tail.partition("\n")
    fenced = fenced.strip()
    if not (fenced.startswith("```") and fenced.endswith("```") and len(fenced) >= 6):
        return None, None
    fenced = fenced[3:-3]
    if fenced.startswith("json"):
        fenced = fenced[len("json") :]
    return name.strip(), _loads(fenced)


def _loads(text: str) -> Any:
    """Strict JSON (no NaN/Infinity: they could not be re-serialized as JSON); None if invalid."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_format(fmt: str) -> str:
    """`fmt` if it is a known tool-call format. Raises `ValueError` otherwise."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown tool-call format {fmt!r}; expected one of {FORMATS}")
    return fmt
