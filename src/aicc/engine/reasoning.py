"""Splits DeepSeek-R1 style output into reasoning (`<think>…</think>`) and content.

Mirrors DeepSeek's own API: the text inside the think tags becomes `reasoning_content`, the rest
`content`, and neither carries the tags or the newlines that frame them (R1 writes
`<think>\\n…\\n</think>\\n\\n…`). Text arrives in arbitrary pieces, so a tag may be split across
pushes; only the bytes that could still become a tag (or a framing newline) are held back.
"""

from __future__ import annotations

from enum import Enum, auto

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_NEWLINES = "\r\n"
"""The framing characters dropped around the tags (never other whitespace)."""


def tag_prefix_len(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    best = 0
    for tag in tags:
        for length in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:length]):
                best = length
                break
    return best


class _State(Enum):
    PREAMBLE = auto()
    """Before any text is known: a `<think>` may still open (after optional whitespace)."""
    REASONING = auto()
    CONTENT_START = auto()
    """Just after `</think>`: the framing newlines are being dropped."""
    CONTENT = auto()


class ReasoningSplitter:
    """Routes streamed text to (reasoning, content) deltas; one instance per choice.

    `starts_in_reasoning`: the prompt already ends with `<think>` (R1's template opens it), so
    everything up to `</think>` is reasoning. Otherwise only a `<think>` at the very start of the
    output (after optional whitespace) opens reasoning; a `<think>` later on is plain content.
    Output that ends inside reasoning (no `</think>`) stays reasoning.
    """

    def __init__(self, starts_in_reasoning: bool) -> None:
        self._state = _State.REASONING if starts_in_reasoning else _State.PREAMBLE
        self._held = ""
        self._at_reasoning_start = True
        """The newline after `<think>` is framing, not reasoning."""

    def push(self, text: str) -> tuple[str, str]:
        """Add generated text; return the (reasoning, content) text now safe to release."""
        self._held += text
        reasoning, content = "", ""
        while True:
            if self._state is _State.PREAMBLE:
                if not self._leave_preamble():
                    break
            elif self._state is _State.REASONING:
                reasoning += self._take_reasoning()
                if self._state is _State.REASONING:
                    break
            elif self._state is _State.CONTENT_START:
                self._held = self._held.lstrip(_NEWLINES)
                if not self._held:
                    break
                self._state = _State.CONTENT
            else:
                content += self._held
                self._held = ""
                break
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """The output ended: release what is held (an unclosed reasoning stays reasoning)."""
        held, self._held = self._held, ""
        if self._state is _State.REASONING:
            return held, ""
        if self._state is _State.CONTENT_START:
            return "", ""
        return "", held

    def _leave_preamble(self) -> bool:
        """Decide whether the output opens with `<think>`; False while it cannot be known yet."""
        rest = self._held.lstrip()
        if rest.startswith(THINK_OPEN):
            # The whitespace before the tag is formatting, like the tag itself.
            self._held = rest[len(THINK_OPEN) :]
            self._state = _State.REASONING
            return True
        if THINK_OPEN.startswith(rest):
            return False
        self._state = _State.CONTENT
        return True

    def _take_reasoning(self) -> str:
        """Release reasoning up to `</think>` (switching state) or up to what must be held."""
        if self._at_reasoning_start:
            self._held = self._held.lstrip(_NEWLINES)
            if not self._held:
                return ""
            self._at_reasoning_start = False
        end = self._held.find(THINK_CLOSE)
        if end >= 0:
            reasoning = self._held[:end].rstrip(_NEWLINES)
            self._held = self._held[end + len(THINK_CLOSE) :]
            self._state = _State.CONTENT_START
            return reasoning
        # Hold a possible partial `</think>` and the newlines that may precede it.
        keep_from = len(self._held) - tag_prefix_len(self._held, (THINK_CLOSE,))
        keep_from = len(self._held[:keep_from].rstrip(_NEWLINES))
        reasoning, self._held = self._held[:keep_from], self._held[keep_from:]
        return reasoning
