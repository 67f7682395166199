"""Writing GBNF text: literals and character classes, escaped the way llama.cpp parses them."""

from __future__ import annotations

import json
from collections.abc import Iterable

MAX_CODEPOINT = 0x10FFFF
# Characters a JSON string may hold raw: not control characters, not `"` or `\` (those need an
# escape), not surrogates (they cannot be encoded as UTF-8 on their own).
_JSON_UNSAFE = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0xD800, 0xDFFF))

Ranges = tuple[tuple[int, int], ...]


def _escape_char(code: int, *, in_class: bool) -> str:
    char = chr(code)
    if char == "\\":
        return "\\\\"
    if char == '"' and not in_class:
        return '\\"'
    if in_class and char in "]-^[":
        return f"\\x{code:02X}"
    if char == "\n":
        return "\\n"
    if char == "\r":
        return "\\r"
    if char == "\t":
        return "\\t"
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02X}"
    if in_class and not (char.isascii() and char.isalnum()):
        # Escaped so that no special or invisible character can change how the class parses.
        return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"
    return char


def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal that matches exactly these characters."""
    return '"' + "".join(_escape_char(ord(c), in_class=False) for c in text) + '"'


def gbnf_class(ranges: Iterable[tuple[int, int]]) -> str:
    """A positive GBNF character class for the code point ranges (must not be empty)."""
    parts = []
    for lo, hi in ranges:
        first = _escape_char(lo, in_class=True)
        parts.append(first if lo == hi else f"{first}-{_escape_char(hi, in_class=True)}")
    return "[" + "".join(parts) + "]"


def json_literal(text: str) -> str:
    """A GBNF literal matching `text` as it appears inside a JSON string (escaped as JSON)."""
    return gbnf_literal(json.dumps(text, ensure_ascii=False)[1:-1])


def normalize(ranges: Iterable[tuple[int, int]]) -> Ranges:
    """Sort and merge overlapping or adjacent ranges."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def complement(ranges: Ranges) -> Ranges:
    """All code points not in the (normalized) ranges."""
    result = []
    start = 0
    for lo, hi in ranges:
        if lo > start:
            result.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODEPOINT:
        result.append((start, MAX_CODEPOINT))
    return tuple(result)


def subtract(ranges: Ranges, removed: Ranges) -> Ranges:
    return complement(normalize((*complement(ranges), *removed)))


def contains(ranges: Ranges, code: int) -> bool:
    return any(lo <= code <= hi for lo, hi in ranges)


def json_char_set(ranges: Ranges) -> str | None:
    """GBNF for one character of the set as written inside a JSON string, or None if empty.

    Characters JSON must escape are matched in their escaped form: `"` and `\\` as `\\"` and
    `\\\\`, control characters as `\\uXXXX` (and `\\n`, `\\t`... where JSON has a short form).
    """
    alternatives = []
    raw = subtract(ranges, normalize(_JSON_UNSAFE))
    if raw:
        alternatives.append(gbnf_class(raw))
    for char in '"\\':
        if contains(ranges, ord(char)):
            alternatives.append(gbnf_literal("\\" + char))
    alternatives += _control_escapes(ranges)
    if not alternatives:
        return None
    return alternatives[0] if len(alternatives) == 1 else "(" + " | ".join(alternatives) + ")"


def _control_escapes(ranges: Ranges) -> list[str]:
    """Escaped forms of the control characters (U+0000-U+001F) in the set: `\\u00XX` as at
    most two rules (by the high digit), plus JSON's short forms (`\\n`, `\\t`...) as one."""
    codes = [code for code in range(0x20) if contains(ranges, code)]
    escapes = []
    for high in (0, 1):
        digits = "".join(
            f"{low:x}{low:X}" if low > 9 else str(low)
            for low in range(16)
            if high * 16 + low in codes
        )
        if digits:
            escapes.append(f'"\\\\u00{high}" [{digits}]')
    shorts = "".join(
        short[1] for code in codes if not (short := json.dumps(chr(code))[1:-1]).startswith("\\u")
    )
    if shorts:
        escapes.append(f'"\\\\" [{shorts}]')
    return escapes
