"""JSON Schema `pattern` (ECMA-262 syntax, a safe subset) → GBNF for the JSON-encoded string body.

The regex is parsed into a small tree, checked against the limits, then written as GBNF. Shapes
that make a grammar ambiguous (a repeated group that itself holds a variable repetition, like
`(a+)+`, or a repeated alternation whose branches can start with the same character, like
`(a|aa)*`) are refused: llama.cpp tracks every way the text so far can be parsed, and with
those shapes the number of ways grows exponentially with each generated character.
"""

from __future__ import annotations

from dataclasses import dataclass

from aicc.engine.grammar import gbnf
from aicc.engine.grammar.limits import GrammarLimits
from aicc.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class Chars:
    """One character out of a set of code point ranges."""

    ranges: gbnf.Ranges


@dataclass(frozen=True, slots=True)
class Group:
    alternatives: tuple[tuple[Node, ...], ...]


@dataclass(frozen=True, slots=True)
class Repeat:
    node: Node
    min_count: int
    max_count: int | None  # None: unbounded


Node = Chars | Group | Repeat

_DIGIT = ((0x30, 0x39),)
_WORD = gbnf.normalize(((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)))
_SPACE = gbnf.normalize(
    ((0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
     (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF))
)  # fmt: skip
_SHORTHANDS = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
_DOT = gbnf.complement(gbnf.normalize(((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029))))
_ANY = ((0, gbnf.MAX_CODEPOINT),)
_CONTROL_ESCAPES = {"t": 0x09, "n": 0x0A, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}


class _Parser:
    def __init__(self, pattern: str, end: int, limits: GrammarLimits, param: str) -> None:
        self.pattern = pattern
        self.text = pattern[:end]  # without the end anchor; indices stay those of `pattern`
        self.pos = 1 if pattern.startswith("^") else 0
        self.limits = limits
        self.param = param

    def fail(self, reason: str) -> InvalidRequestError:
        return InvalidRequestError(
            f"pattern {self.pattern!r} is not supported: {reason}", param=self.param
        )

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self) -> str:
        char = self.peek()
        if not char:
            raise self.fail("it ends in the middle of an expression")
        self.pos += 1
        return char

    def alternation(self, depth: int) -> Group:
        if depth > self.limits.max_depth:
            raise self.fail(f"groups nest deeper than {self.limits.max_depth}")
        alternatives = [self.sequence(depth)]
        while self.peek() == "|":
            self.pos += 1
            alternatives.append(self.sequence(depth))
        return Group(tuple(alternatives))

    def sequence(self, depth: int) -> tuple[Node, ...]:
        nodes: list[Node] = []
        while self.peek() not in ("", "|", ")"):
            nodes.append(self.quantified(self.atom(depth)))
        return tuple(nodes)

    def quantified(self, node: Node) -> Node:
        char = self.peek()
        if char in ("*", "+", "?"):
            self.pos += 1
            bounds: tuple[int, int | None] = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
        elif char == "{":
            bounds = self.braces()
        else:
            return node
        if self.peek() == "?":  # lazy: the same language, only the match preference differs
            self.pos += 1
        if self.peek() in ("*", "+", "?", "{"):
            raise self.fail(f"a quantifier follows a quantifier at index {self.pos}")
        low, high = bounds
        for bound in (low, high):
            if bound is not None and bound > self.limits.max_repetition:
                raise self.fail(f"repetition bound {bound} exceeds {self.limits.max_repetition}")
        if high is not None and low > high:
            raise self.fail(f"repetition {{{low},{high}}} has min > max")
        return Repeat(node, low, high)

    def braces(self) -> tuple[int, int | None]:
        end = self.text.find("}", self.pos)
        body = self.text[self.pos + 1 : end] if end > 0 else ""
        low_text, comma, high_text = body.partition(",")
        if not low_text.isdigit() or not (high_text.isdigit() or high_text == ""):
            raise self.fail(f"'{{' at index {self.pos} is not a {{m}}, {{m,}} or {{m,n}} bound")
        self.pos = end + 1
        if max(len(low_text), len(high_text)) > 9:  # never int() a hostile 5000-digit string
            raise self.fail(f"repetition bound {{{body}}} exceeds {self.limits.max_repetition}")
        low = int(low_text)
        if not comma:
            return low, low
        return low, int(high_text) if high_text else None

    def atom(self, depth: int) -> Node:
        index = self.pos
        char = self.take()
        if char == "(":
            if self.peek() == "?":
                if self.text[self.pos : self.pos + 2] != "?:":
                    raise self.fail(f"lookarounds and named groups (index {index})")
                self.pos += 2
            group = self.alternation(depth + 1)
            if self.take() != ")":
                raise self.fail(f"unbalanced '(' at index {index}")
            return group
        if char == "[":
            return self.char_class()
        if char == ".":
            return Chars(_DOT)
        if char == "\\":
            return Chars(self.escape(in_class=False))
        if char in "*+?{":
            raise self.fail(f"nothing to repeat at index {index}")
        if char in "^$":
            raise self.fail(f"anchor '{char}' is only supported at the start and end")
        return Chars(((ord(char), ord(char)),))

    def escape(self, *, in_class: bool) -> gbnf.Ranges:
        index = self.pos - 1
        char = self.take()
        if char in _SHORTHANDS:
            return _SHORTHANDS[char]
        if char.lower() in _SHORTHANDS:
            return gbnf.complement(_SHORTHANDS[char.lower()])
        code: int | None = _CONTROL_ESCAPES.get(char)
        if char == "b" and in_class:
            code = 0x08
        elif char in ("x", "u"):
            digits = self.text[self.pos : self.pos + (2 if char == "x" else 4)]
            if len(digits) != (2 if char == "x" else 4) or not all(
                d in "0123456789abcdefABCDEF" for d in digits
            ):
                raise self.fail(f"malformed \\{char} escape at index {index}")
            self.pos += len(digits)
            code = int(digits, 16)
        elif not char.isalnum():
            code = ord(char)
        if code is None:
            raise self.fail(f"escape \\{char} at index {index} (word boundaries, back-references "
                            "and property classes are not supported)")  # fmt: skip
        return ((code, code),)

    def char_class(self) -> Chars:
        index = self.pos - 1
        negated = self.peek() == "^"
        self.pos += negated
        ranges: list[tuple[int, int]] = []
        while self.peek() != "]":
            low = self.class_atom()
            if self.peek() == "-" and self.text[self.pos + 1 : self.pos + 2] not in ("]", ""):
                self.pos += 1
                high = self.class_atom()
                if len(low) != 1 or len(high) != 1 or low[0][0] != low[0][1] or (
                    high[0][0] != high[0][1]
                ) or low[0][0] > high[0][0]:  # fmt: skip
                    raise self.fail(f"bad range in character class at index {index}")
                ranges.append((low[0][0], high[0][0]))
            else:
                ranges.extend(low)
        self.pos += 1
        if not ranges:
            raise self.fail(f"empty character class at index {index}")
        merged = gbnf.normalize(ranges)
        return Chars(gbnf.complement(merged) if negated else merged)

    def class_atom(self) -> gbnf.Ranges:
        char = self.take()
        if char == "\\":
            return self.escape(in_class=True)
        return ((ord(char), ord(char)),)


def parse_pattern(pattern: str, limits: GrammarLimits, *, param: str) -> tuple[Node, ...]:
    """Parse and check `pattern`; returns the sequence it must match in full.

    Raises:
        InvalidRequestError: the pattern is too long, uses unsupported syntax, exceeds a
            repetition bound, or has an ambiguous (exponential) shape.
    """
    if len(pattern) > limits.max_pattern_length:
        raise InvalidRequestError(
            f"pattern is {len(pattern)} characters long; the limit is "
            f"{limits.max_pattern_length}", param=param,
        )  # fmt: skip
    before_end = pattern[1 if pattern.startswith("^") else 0 : -1]
    # `\$` is a literal dollar sign, `\\$` a literal backslash and then the anchor.
    anchored_end = pattern.endswith("$") and pattern != "^" and (
        len(before_end) - len(before_end.rstrip("\\"))
    ) % 2 == 0  # fmt: skip
    parser = _Parser(pattern, len(pattern) - anchored_end, limits, param)
    group = parser.alternation(1)
    if parser.pos != len(parser.text):
        raise parser.fail(f"unbalanced ')' at index {parser.pos}")
    # JSON Schema patterns are unanchored searches: an open end matches anything.
    anything = Repeat(Chars(_ANY), 0, None)
    nodes = (
        *(() if pattern.startswith("^") else (anything,)),
        group,
        *(() if anchored_end else (anything,)),
    )
    _check_shape(Group((nodes,)), parser, repeated=1, in_loop=False)
    return nodes


def _check_shape(node: Node, parser: _Parser, *, repeated: int, in_loop: bool) -> None:
    if isinstance(node, Repeat):
        loops = node.max_count is None or node.max_count > 1
        if in_loop and node.min_count != node.max_count:
            raise parser.fail("a variable repetition inside a repeated group, like (a+)+, is "
                              "ambiguous")  # fmt: skip
        weight = repeated * max(node.min_count if node.max_count is None else node.max_count, 1)
        if weight > parser.limits.max_repetition:
            raise parser.fail(f"nested repetitions multiply to {weight}, over "
                              f"{parser.limits.max_repetition}")  # fmt: skip
        _check_shape(node.node, parser, repeated=weight, in_loop=in_loop or loops)
    elif isinstance(node, Group):
        if in_loop and len(node.alternatives) > 1:
            firsts = [_first_chars(alt) for alt in node.alternatives]
            for i, first in enumerate(firsts):
                if first is None or any(
                    other is None or _overlap(first, other) for other in firsts[:i]
                ):
                    raise parser.fail("a repeated alternation whose branches can start with the "
                                      "same character, like (a|aa)*, is ambiguous")  # fmt: skip
        for alternative in node.alternatives:
            for child in alternative:
                _check_shape(child, parser, repeated=repeated, in_loop=in_loop)


def _first_chars(sequence: tuple[Node, ...]) -> gbnf.Ranges | None:
    """Characters the sequence can start with; None if it may be empty (conservative)."""
    if not sequence:
        return None
    node = sequence[0]
    if isinstance(node, Chars):
        return node.ranges
    if isinstance(node, Repeat):
        return _first_chars((node.node,)) if node.min_count > 0 else None
    firsts = [_first_chars(alt) for alt in node.alternatives]
    if any(first is None for first in firsts):
        return None
    return gbnf.normalize(r for first in firsts if first is not None for r in first)


def _overlap(a: gbnf.Ranges, b: gbnf.Ranges) -> bool:
    return any(lo1 <= hi2 and lo2 <= hi1 for lo1, hi1 in a for lo2, hi2 in b)
