"""Incremental detokenization with stop strings.

Holds back the bytes of an incomplete UTF-8 character and any tail of the text that could still
grow into a stop string, so a stop string never leaks into the output.
"""

from __future__ import annotations

import codecs


class IncrementalDetokenizer:
    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False
        """True once a stop string was seen; later input is ignored."""

    def push(self, piece: bytes) -> str:
        """Add a token's bytes; return the text that is now safe to release."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(piece)
        if not self._stop:
            self._held = ""
            return text
        cut = _earliest_stop(text, self._stop)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = _longest_stop_prefix_suffix(text, self._stop)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The generation ended without a stop string: release everything held."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text


def _earliest_stop(text: str, stops: tuple[str, ...]) -> int:
    positions = [pos for pos in (text.find(stop) for stop in stops) if pos >= 0]
    return min(positions) if positions else -1


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:length]):
                best = length
                break
    return best
