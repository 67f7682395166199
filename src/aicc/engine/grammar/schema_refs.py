"""Checks on a normalized schema as a whole: `$ref` targets, `$ref` loops and `allOf` parts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aicc.errors import InvalidRequestError

Fail = Callable[[str, str], InvalidRequestError]
"""Builds the error for (JSON pointer, reason)."""
CONTAINERS = frozenset({"$defs", "definitions"})
"""Keywords that only hold subschemas for `$ref`s."""


def resolve_refs(
    ref_sites: list[tuple[str, str]], schemas: dict[str, dict[str, Any]], fail: Fail
) -> dict[str, dict[str, Any]]:
    """The subschema each `$ref` at `ref_sites` (path, ref) names, from `schemas` by pointer.

    Raises:
        InvalidRequestError: a `$ref` names no subschema of this document.
    """
    refs = {}
    for path, ref in ref_sites:
        target = schemas.get(ref) if ref.startswith("#") and "%" not in ref else None
        if target is None:
            raise fail(path, f"$ref {ref!r} does not name a subschema of this document "
                       "(only local '#/...' references are supported)")  # fmt: skip
        refs[ref] = target
    return refs


def check_ref_cycles(root: dict[str, Any], refs: dict[str, dict[str, Any]], fail: Fail) -> None:
    """A $ref loop that consumes no input (A → anyOf → A) is left recursion: refuse it.

    Raises:
        InvalidRequestError: there is such a loop.
    """
    done: set[str] = set()

    def visit(ref: str, trail: tuple[str, ...]) -> None:
        if ref in trail:
            raise fail(ref, "$ref cycle that never consumes input: " + " → ".join(trail))
        if ref not in done:
            for nxt in _direct_refs(refs[ref]):
                visit(nxt, (*trail, ref))
            done.add(ref)

    for ref in (*_direct_refs(root), *refs):
        visit(ref, ())


def check_all_of(
    all_of_sites: list[tuple[str, list[dict[str, Any]]]],
    refs: dict[str, dict[str, Any]],
    fail: Fail,
) -> None:
    """allOf is merged as objects whose properties are all required; nothing else is kept.

    Raises:
        InvalidRequestError: an allOf part is not such an object, or two parts share a property.
    """
    for path, parts in all_of_sites:
        seen: set[str] = set()
        for part in parts:
            part = refs.get(part.get("$ref", ""), part)
            if set(part) - CONTAINERS - {"type", "required"} != {"properties"} or part.get(
                "type", "object"
            ) != "object":  # fmt: skip
                raise fail(path, "allOf is supported only for objects with properties "
                           "and no other keywords")  # fmt: skip
            if dupes := seen & set(part["properties"]):
                raise fail(path, f"allOf parts repeat properties {sorted(dupes)}")
            seen |= set(part["properties"])


def _direct_refs(schema: dict[str, Any]) -> list[str]:
    if "$ref" in schema:
        return [schema["$ref"]]
    members = schema.get("anyOf", []) + schema.get("oneOf", [])
    return [ref for member in members for ref in _direct_refs(member)]
