"""Cheap in-process checks of a client's JSON Schema, and its normalized form for the converter.

llama.cpp's converter honours only part of JSON Schema and silently ignores the rest, which
would let the model produce output that does not validate. So every schema is walked here
first: annotations and unknown keywords (which do not constrain a value) are dropped, keywords
the converter honours are checked in the combinations it honours them, and anything else is a
400 that names the keyword and where it is.

Lenient mode (for tool parameters, whose schemas are written for validators, not grammars) also
drops constraints on values that the grammar cannot enforce — number bounds other than integer
ones, `multipleOf`, unknown string formats, `minProperties`, `uniqueItems`, length bounds past
the repetition limit or combined with another string rule — so the output still has the right
shape and types. Structural keywords it cannot honour, and every limit, still refuse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aicc.engine.grammar.integers import BOUND_KEYS, inclusive_bounds
from aicc.engine.grammar.limits import GrammarLimits
from aicc.engine.grammar.pattern import parse_pattern
from aicc.engine.grammar.schema_refs import (
    CONTAINERS,
    check_all_of,
    check_ref_cycles,
    resolve_refs,
)
from aicc.errors import InvalidRequestError

_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
    "$comment", "$schema", "contentEncoding", "contentMediaType", "contentSchema",
})  # fmt: skip
_UNSUPPORTED = frozenset({
    "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
    "patternProperties", "propertyNames", "contains", "minContains", "maxContains",
    "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor", "$anchor", "$id",
    "$vocabulary", "additionalItems",
})  # fmt: skip
_NO_OP = {"uniqueItems": (False,), "unevaluatedProperties": (False, True),
          "unevaluatedItems": (False, True)}  # fmt: skip
_VALUE_ONLY = frozenset({"multipleOf", "minProperties", "maxProperties", "uniqueItems"})
"""Never enforced; lenient mode drops them."""
_DROPPABLE = frozenset({"minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
                        "format", "pattern"})  # fmt: skip
"""Value constraints lenient mode drops where they are combined with a rule that ignores them."""
_KEPT = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "pattern", "format",
    "minLength", "maxLength", "$ref", "$defs", "definitions", *BOUND_KEYS,
})  # fmt: skip
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4",
                      "uuid5"})  # fmt: skip


def _any_value() -> dict[str, Any]:
    return {"type": ["object", "array", "string", "number", "boolean", "null"]}


@dataclass(frozen=True, slots=True)
class NormalizedSchema:
    """A schema the converter honours in full, and the subschema each `$ref` names."""

    root: dict[str, Any]
    refs: dict[str, dict[str, Any]]


def normalize_schema(
    schema: dict[str, Any] | None, limits: GrammarLimits, *, param: str, lenient: bool = False
) -> NormalizedSchema:
    """Check `schema` against the limits and the supported subset; None means any object.
    `lenient` drops the value constraints a grammar cannot enforce (see the module docstring).

    Raises:
        InvalidRequestError: the schema is too big or deep, or uses a feature the grammar
            cannot enforce (in lenient mode: a structural one).
    """
    if schema is None:
        return NormalizedSchema({"type": "object"}, {})
    try:
        size = len(json.dumps(schema, separators=(",", ":"), allow_nan=False).encode())
    except (RecursionError, TypeError, ValueError) as exc:
        raise InvalidRequestError(
            f"the schema is not serializable JSON: {exc}", param=param
        ) from None
    if size > limits.max_schema_bytes:
        raise InvalidRequestError(
            f"the schema is {size} bytes; the limit is {limits.max_schema_bytes}", param=param
        )
    walker = _Walker(limits, param, lenient)
    if isinstance(schema, dict):  # a root $id only names the document; nested ones move bases
        schema = {key: value for key, value in schema.items() if key != "$id"}
    root = walker.walk(schema, "#", 1)
    refs = resolve_refs(walker.ref_sites, walker.schemas, walker.fail)
    check_ref_cycles(root, refs, walker.fail)
    check_all_of(walker.all_of_sites, refs, walker.fail)
    return NormalizedSchema(root, refs)


class _Walker:
    def __init__(self, limits: GrammarLimits, param: str, lenient: bool) -> None:
        self.limits = limits
        self.param = param
        self.lenient = lenient
        self.num_nodes = 0
        self.schemas: dict[str, dict[str, Any]] = {}  # JSON pointer → normalized subschema
        self.ref_sites: list[tuple[str, str]] = []
        self.all_of_sites: list[tuple[str, list[dict[str, Any]]]] = []

    def fail(self, path: str, reason: str) -> InvalidRequestError:
        return InvalidRequestError(f"unsupported schema at {path}: {reason}", param=self.param)

    def walk(self, schema: Any, path: str, depth: int) -> dict[str, Any]:
        if depth > self.limits.max_depth:
            raise self.fail(path, f"it nests deeper than {self.limits.max_depth} levels")
        self.num_nodes += 1
        if self.num_nodes > self.limits.max_nodes:
            raise self.fail(path, f"more than {self.limits.max_nodes} subschemas")
        if not isinstance(schema, dict):
            raise self.fail(path, "expected a schema object (boolean schemas are not supported)")
        out: dict[str, Any] = {}
        for key, value in schema.items():
            if self.lenient and key in _VALUE_ONLY:
                continue
            if key in _UNSUPPORTED or (key in _VALUE_ONLY and key not in _NO_OP):
                raise self.fail(path, f"keyword {key!r} cannot be enforced by a grammar")
            if key in _NO_OP and not any(value is v for v in _NO_OP[key]):
                raise self.fail(path, f"{key}={json.dumps(value)} cannot be enforced")
            if key in _KEPT:
                out[key] = value
        self.schemas[path] = out
        for key in ("$defs", "definitions", "properties"):
            if key in out:
                out[key] = {
                    name: self.walk(sub, f"{path}/{key}/{_escape(name)}", depth + 1)
                    for name, sub in self.mapping(out[key], path, key).items()
                }
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if key in out:
                items = out[key]
                if not isinstance(items, list) or not items:
                    raise self.fail(path, f"{key} must be a non-empty array")
                out[key] = [
                    self.walk(s, f"{path}/{key}/{i}", depth + 1) for i, s in enumerate(items)
                ]
        self.walk_items(out, path, depth)
        if isinstance(out.get("additionalProperties"), dict):
            sub = out["additionalProperties"]
            out["additionalProperties"] = self.walk(sub, f"{path}/additionalProperties", depth + 1)
        self.check_shape(out, path)
        return out

    def mapping(self, value: Any, path: str, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"{key} must be an object")
        return value

    def walk_items(self, out: dict[str, Any], path: str, depth: int) -> None:
        items = out.get("items")
        if items is True or (items is False and "prefixItems" in out):
            del out["items"]  # no constraint / "exactly the prefix items", which is what we emit
        elif isinstance(items, dict):
            out["items"] = self.walk(items, f"{path}/items", depth + 1)
        elif "items" in out:
            raise self.fail(path, "items must be a schema (use prefixItems for tuples)")

    def check_shape(self, out: dict[str, Any], path: str) -> None:
        """The converter picks one meaning per schema; refuse keywords that meaning ignores."""
        kind = out.get("type")
        if "format" in out and isinstance(kind, str) and kind != "string":
            del out["format"]  # string formats do not constrain other types
        if self.lenient and "format" in out and out["format"] not in _FORMATS:
            del out["format"]  # what is left is a plain string
        self.integer_bounds(out, path)
        keys = set(out) - CONTAINERS

        def only(*allowed: str) -> None:
            if extra := self.extra_keys(out, keys, allowed):
                raise self.fail(path, f"{sorted(extra)} cannot be combined with {allowed[0]!r}")

        if isinstance(kind, list):
            if not kind or any(t not in _TYPES for t in kind) or len(set(kind)) != len(kind):
                raise self.fail(path, f"bad type list {kind!r}")
        elif kind is not None and kind not in _TYPES:
            raise self.fail(path, f"unknown type {kind!r}")
        if "$ref" in keys:
            only("$ref")
            if not isinstance(out["$ref"], str):
                raise self.fail(path, "$ref must be a string")
            self.ref_sites.append((path, out["$ref"]))
        elif "anyOf" in keys or "oneOf" in keys:
            only("anyOf" if "anyOf" in keys else "oneOf")
        elif "const" in keys or "enum" in keys:
            key = "const" if "const" in keys else "enum"
            only(key, "type")
            values = [out["const"]] if key == "const" else out["enum"]
            if not isinstance(values, list) or not values:
                raise self.fail(path, "enum must be a non-empty array")
            kinds = [kind] if isinstance(kind, str) else kind
            if kinds is not None and any(not any(_has_type(v, k) for k in kinds) for v in values):
                raise self.fail(path, f"a {key} value is not of type {kind!r}")
            out.pop("type", None)  # checked; the converter would let a type list win over enum
        elif isinstance(kind, list):
            only("type")
        elif kind in (None, "object") and ("properties" in keys or "additionalProperties" in keys):
            only("properties", "type", "required", "additionalProperties")
            extra = out.get("additionalProperties")
            if extra is not None and not isinstance(extra, bool | dict):
                raise self.fail(path, "additionalProperties must be a schema or boolean")
            required = out.get("required", [])
            if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
                raise self.fail(path, "required must be an array of strings")
            if missing := set(required) - set(out.get("properties", {})):
                raise self.fail(path, f"required {sorted(missing)} not listed in properties")
        elif kind in (None, "object") and "allOf" in keys:
            only("allOf", "type")
            self.all_of_sites.append((path, out["allOf"]))
        elif kind in (None, "array") and ("items" in keys or "prefixItems" in keys):
            only("items" if "items" in keys else "prefixItems", "type", "minItems", "maxItems")
            low, high = self.bounds(out, path, "minItems", "maxItems")
            num_prefix = len(out.get("prefixItems", ()))
            if num_prefix and not low <= num_prefix <= (num_prefix if high is None else high):
                raise self.fail(path, "minItems/maxItems contradict the prefixItems length")
        elif kind == "array" and keys <= {"type", "minItems", "maxItems"}:
            self.bounds(out, path, "minItems", "maxItems")
            out["items"] = _any_value()
        elif kind in (None, "string") and "pattern" in keys:
            only("pattern", "type")
            if not isinstance(out["pattern"], str):
                raise self.fail(path, "pattern must be a string")
            parse_pattern(out["pattern"], self.limits, param=self.param)
        elif kind in (None, "string") and "format" in keys:
            only("format", "type")
            if out["format"] not in _FORMATS:
                raise self.fail(path, f"format {out['format']!r} is not supported (supported: "
                                f"{', '.join(sorted(_FORMATS))})")  # fmt: skip
        elif kind in (None, "string") and keys & {"minLength", "maxLength"}:
            only("minLength", "type", "maxLength")
            self.bounds(out, path, "minLength", "maxLength")
            out["type"] = "string"  # the converter needs it explicit; only strings have a length
        elif kind == "integer" and "minimum" in keys:
            only("minimum", "type", "maximum")
        elif not keys:
            out.update(_any_value())  # the converter would narrow {} to objects only
        elif extra := self.extra_keys(out, keys, ("type",)):
            raise self.fail(path, f"{sorted(extra)} not supported with type {kind!r}")

    def extra_keys(self, out: dict[str, Any], keys: set[str], allowed: tuple[str, ...]) -> set[str]:
        """`keys` outside `allowed`, after lenient mode dropped the droppable ones from both."""
        extra = keys - set(allowed)
        if self.lenient:
            for key in extra & _DROPPABLE:
                del out[key]
                keys.discard(key)
            extra -= _DROPPABLE
        return extra

    def integer_bounds(self, out: dict[str, Any], path: str) -> None:
        """Integer bounds become inclusive `minimum` and `maximum`; on other types they are
        refused (lenient mode: dropped)."""
        values = {key: out.pop(key) for key in BOUND_KEYS if key in out}
        if not values:
            return
        if out.get("type") != "integer":
            if self.lenient:
                return
            raise self.fail(path, f"{sorted(values)} can be enforced only with type 'integer'")
        try:
            out["minimum"], out["maximum"] = inclusive_bounds(values)
        except ValueError as exc:
            raise self.fail(path, str(exc)) from None

    def bounds(
        self, out: dict[str, Any], path: str, low_key: str, high_key: str
    ) -> tuple[int, int | None]:
        values = []
        for key in (low_key, high_key):
            value = out.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= self.limits.max_repetition):  # fmt: skip
                if self.lenient and type(value) is int and value > 0:
                    del out[key]  # past the limit: unbounded is cheaper, and still the shape
                    value = None
                else:
                    raise self.fail(
                        path, f"{key} must be an integer in 0..{self.limits.max_repetition}"
                    )
            values.append(value)
        low, high = values[0] or 0, values[1]
        if high is not None and low > high:
            raise self.fail(path, f"{low_key} > {high_key}")
        return low, high


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _has_type(value: Any, kind: str) -> bool:
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    python_types: dict[str, type | tuple[type, ...]] = {
        "object": dict, "array": list, "string": str, "number": (int, float),
        "boolean": bool, "null": type(None),
    }  # fmt: skip
    if kind == "number" and isinstance(value, bool):
        return False
    return isinstance(value, python_types[kind])
