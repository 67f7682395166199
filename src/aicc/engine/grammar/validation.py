"""Is a value a valid JSON Schema at all (before asking whether a grammar can enforce it)."""

from __future__ import annotations

from typing import Any

from aicc.errors import InvalidRequestError

MAX_NESTING = 64
"""JSON nesting a schema may have; the meta-schema check recurses per level (a schema nested
hundreds deep would exhaust Python's stack, not just take long)."""


def check_json_schema(schema: Any, *, param: str) -> None:
    """Check `schema` against the JSON Schema 2020-12 meta-schema.

    Raises:
        InvalidRequestError: it is not a valid schema; the message says where and why.
    """
    # Imported here, not at module level: the grammar worker process imports this package and
    # should not pay ~0.2 s for jsonschema, which it never uses.
    import jsonschema

    if _nesting(schema) > MAX_NESTING:
        raise InvalidRequestError(
            f"the schema is nested deeper than {MAX_NESTING} levels", param=param
        )
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except RecursionError:
        raise InvalidRequestError("the schema is nested too deeply", param=param) from None
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise InvalidRequestError(
            f"invalid JSON Schema at {where}: {exc.message}", param=param
        ) from None


def _nesting(value: Any) -> int:
    """Depth of nested lists and dicts, without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            if depth > MAX_NESTING:
                return depth
            stack.extend((child, depth + 1) for child in item)
    return deepest
