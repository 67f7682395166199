"""Writing a parsed `pattern` as GBNF for the body of a JSON string."""

from __future__ import annotations

from aicc.engine.grammar import gbnf
from aicc.engine.grammar.pattern import Chars, Group, Node
from aicc.errors import InvalidRequestError


def pattern_to_gbnf(nodes: tuple[Node, ...], *, param: str) -> str:
    """GBNF for the body of a JSON string whose decoded value matches the parsed pattern.

    Raises:
        InvalidRequestError: a character class holds no character a JSON string can carry.
    """
    return _sequence(nodes, param) or '""'


def _sequence(nodes: tuple[Node, ...], param: str) -> str:
    parts: list[str] = []
    literal = ""
    for node in nodes:
        if isinstance(node, Chars) and _single_char(node):
            literal += chr(node.ranges[0][0])
            continue
        if literal:
            parts.append(gbnf.json_literal(literal))
            literal = ""
        parts.append(_node(node, param))
    if literal:
        parts.append(gbnf.json_literal(literal))
    return " ".join(parts)


def _single_char(node: Chars) -> bool:
    """One code point with a single JSON form, written as a literal (not a lone surrogate, which
    cannot be written at all, nor a control character, which JSON may escape two ways)."""
    if len(node.ranges) != 1:
        return False
    low, high = node.ranges[0]
    return low == high and low >= 0x20 and not 0xD800 <= low <= 0xDFFF


def _node(node: Node, param: str) -> str:
    if isinstance(node, Chars):
        if _single_char(node):
            return gbnf.json_literal(chr(node.ranges[0][0]))
        text = gbnf.json_char_set(node.ranges)
        if text is None:
            raise InvalidRequestError(
                "a pattern character class matches no character a JSON string can hold raw",
                param=param,
            )
        return text
    if isinstance(node, Group):
        return "(" + " | ".join(_sequence(alt, param) or '""' for alt in node.alternatives) + ")"
    inner = _node(node.node, param)
    if isinstance(node.node, Chars) and not inner.startswith(("[", "(")):
        inner = f"({inner})"  # a multi-character JSON escape must repeat as a whole
    low, high = node.min_count, node.max_count
    if high is None:
        suffix = "*" if low == 0 else "+" if low == 1 else f"{{{low},}}"
    elif low == high:
        suffix = f"{{{low}}}"
    else:
        suffix = "?" if (low, high) == (0, 1) else f"{{{low},{high}}}"
    return inner + suffix
