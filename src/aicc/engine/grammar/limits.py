"""Bounds on what a client's JSON Schema may cost us to turn into a grammar."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GrammarLimits:
    """Every bound is checked before any conversion work; exceeding one is a 400."""

    max_schema_bytes: int = 65536
    """Size of the schema serialized as compact JSON."""
    max_depth: int = 24
    """Nesting of subschemas (objects, arrays, combinators) and of groups in a pattern."""
    max_nodes: int = 2000
    """Number of subschemas in the whole document, `$defs` included."""
    max_pattern_length: int = 256
    """Characters in one `pattern` regular expression."""
    max_repetition: int = 128
    """Bound on `{m,n}` in patterns (nested bounds multiply), minItems/maxItems,
    minLength/maxLength and on how many times a tool call may repeat."""
    max_grammar_bytes: int = 262144
    """Size of the resulting GBNF text."""
    compile_timeout_s: float = 5.0
    """Wall time the worker process may spend on one conversion before it is killed."""
