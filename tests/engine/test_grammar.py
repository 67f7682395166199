"""JSON Schema → GBNF: checked against llama.cpp's own grammar parser and sampler."""

from __future__ import annotations

import asyncio
import ctypes
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from aicc.engine.grammar import GrammarCompiler, GrammarLimits, check_json_schema
from aicc.engine.grammar.integers import integer_range_gbnf
from aicc.errors import InvalidRequestError
from aicc.store.local import ensure_bundled

LIMITS = GrammarLimits()
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
    },
    "required": ["city"],
    "additionalProperties": False,
}


class Vocab:
    """The bundled model's vocabulary (no weights), to parse grammars and run their sampler."""

    def __init__(self, path: Path) -> None:
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert self.model
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)

    def parses(self, gbnf: str) -> bool:
        sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
        return bool(sampler)

    def accepts(self, gbnf: str, text: str) -> bool:
        """Whether the grammar lets the model write exactly `text` and then stop."""
        sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        assert sampler
        data = text.encode()
        buffer = (llama_cpp.llama_token * (len(data) + 8))()
        count = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), buffer, len(buffer), False, False
        )
        try:
            for token in [*buffer[:count], llama_cpp.llama_vocab_eos(self.vocab)]:
                candidate = (llama_cpp.llama_token_data * 1)(
                    llama_cpp.llama_token_data(token, 0.0, 0.0)
                )
                array = llama_cpp.llama_token_data_array(candidate, 1, -1, False)
                llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
                if candidate[0].logit == -math.inf:
                    return False
                llama_cpp.llama_sampler_accept(sampler, token)
            return True
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def close(self) -> None:
        llama_cpp.llama_model_free(self.model)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vocab]:
    llama_cpp.llama_backend_init()
    loaded = Vocab(ensure_bundled(tmp_path_factory.mktemp("models")).path)
    yield loaded
    loaded.close()


@pytest.fixture
def compiler() -> Iterator[GrammarCompiler]:
    pool = GrammarCompiler(max_workers=2)
    yield pool
    pool.close()


def compile_now(
    compiler: GrammarCompiler, schema: Any, limits: GrammarLimits = LIMITS, **kw: Any
) -> str:
    return asyncio.run(compiler.compile(schema, limits, **kw))


def refused(
    compiler: GrammarCompiler, schema: Any, limits: GrammarLimits = LIMITS, **kw: Any
) -> str:
    started = time.monotonic()
    with pytest.raises(InvalidRequestError) as info:
        compile_now(compiler, schema, limits, param="tools[0].function.parameters", **kw)
    assert time.monotonic() - started < 1.0
    assert info.value.param == "tools[0].function.parameters"
    return info.value.message


# -- what compiles, and what the grammar then lets through ------------------------------------
SUPPORTED = [
    WEATHER,
    {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "maybe"},
    {"type": ["string", "null"], "enum": ["a", None]},
    {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 128},
    {"type": "string", "minLength": 2, "maxLength": 128},
    {"type": "string", "format": "date-time"},
    {"prefixItems": [{"type": "string"}, {"type": "boolean"}], "items": False},
    {"allOf": [{"properties": {"a": {"type": "integer"}}},
               {"properties": {"b": {"type": "null"}}}]},
    {"$defs": {"date": {"type": "object",
                        "properties": {"d": {"type": "string", "format": "date"}}},
               "node": {"type": "object", "properties": {
                   "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                   "when": {"$ref": "#/$defs/date"}}}},
     "$ref": "#/$defs/node"},
    {"type": "object", "properties": {"tree": {"$ref": "#"}, "x-unknown": {}}, "nullable": True},
    {},
    {"type": "string", "pattern": "^(a|)b[^\\d]?\\$$"},
    {"type": "string", "pattern": "ab(c|de)*"},
    {"type": "integer", "minimum": -3, "exclusiveMaximum": 1e3},
]  # fmt: skip


@pytest.mark.parametrize("schema", SUPPORTED)
def test_supported_schemas_give_grammars_llama_cpp_accepts(
    compiler: GrammarCompiler, vocab: Vocab, schema: dict[str, Any]
) -> None:
    assert vocab.parses(compile_now(compiler, schema))


def test_the_grammar_admits_valid_json_and_nothing_else(
    compiler: GrammarCompiler, vocab: Vocab
) -> None:
    gbnf = compile_now(compiler, WEATHER)
    assert vocab.accepts(gbnf, '{"city": "Paris", "unit": "celsius", "days": 3}')
    assert vocab.accepts(gbnf, '{"city": "Oslo"}')
    assert not vocab.accepts(gbnf, '{"unit": "celsius"}')  # city is required
    assert not vocab.accepts(gbnf, '{"city": "Oslo", "unit": "kelvin"}')
    assert not vocab.accepts(gbnf, '{"city": "Oslo", "extra": 1}')
    assert not vocab.accepts(gbnf, '{"city": "line\nbreak"}')  # raw control char in a string


def test_pattern_control_characters_in_their_json_escapes(
    compiler: GrammarCompiler, vocab: Vocab
) -> None:
    tab = compile_now(compiler, {"type": "string", "pattern": r"^a[\t]b$"})
    assert vocab.accepts(tab, json.dumps("a\tb"))  # "a\\tb"
    assert vocab.accepts(tab, '"a\\u0009b"')
    assert not vocab.accepts(tab, '"a\\u000ab"')
    assert not vocab.accepts(tab, '"a\tb"')  # a raw tab is not valid JSON
    anything = compile_now(compiler, {"type": "string", "pattern": "^[^x]+$"})
    assert vocab.accepts(anything, json.dumps("a\u0001b\nc\u001fd"))
    assert not vocab.accepts(anything, json.dumps("axb"))


def test_json_object_mode_allows_any_object(compiler: GrammarCompiler, vocab: Vocab) -> None:
    gbnf = compile_now(compiler, None)
    assert vocab.accepts(gbnf, '{"a": [1, "x", {"b": null}], "c": true}')
    assert not vocab.accepts(gbnf, "[1, 2]")
    assert not vocab.accepts(gbnf, "Sure! Here is JSON:")


def test_literals_with_quotes_backslashes_and_newlines(
    compiler: GrammarCompiler, vocab: Vocab
) -> None:
    value = 'a\\b\n"é"'
    gbnf = compile_now(compiler, {"const": value})
    assert vocab.accepts(gbnf, json.dumps(value))
    assert not vocab.accepts(gbnf, json.dumps("a\\b"))
    pattern = compile_now(compiler, {"type": "string", "pattern": r'^\d{2}[.\-"\\]x+$'})
    assert vocab.accepts(pattern, json.dumps('12"xx'))
    assert vocab.accepts(pattern, json.dumps("12\\x"))
    assert not vocab.accepts(pattern, json.dumps("1a-x"))
    unanchored = compile_now(compiler, {"pattern": "ab(c|de)*"})
    assert vocab.accepts(unanchored, json.dumps("x abdec \\ y"))
    assert not vocab.accepts(unanchored, json.dumps("x adc"))


def test_prefix_suffix_and_repetition_for_tool_calls(
    compiler: GrammarCompiler, vocab: Vocab
) -> None:
    # Non-ASCII marker, as DeepSeek's; "▁" is left out only because this SPM vocabulary
    # tokenizes it as a space, so the text would not round-trip through the tokens.
    call = '<｜tool_call｜>\u00e9{"name": "get_weather", "arguments": '
    gbnf = compile_now(
        compiler, WEATHER, prefix=call, suffix="}\n</tool_call>", min_count=1, max_count=2,
        separator="\n",
    )  # fmt: skip
    one = call + '{"city": "Rome"}}\n</tool_call>'
    assert vocab.accepts(gbnf, one)
    assert vocab.accepts(gbnf, one + "\n" + one)
    assert not vocab.accepts(gbnf, one + "\n" + one + "\n" + one)  # max_count
    assert not vocab.accepts(gbnf, "")
    exactly_two = compile_now(compiler, WEATHER, prefix="<call>", min_count=2, max_count=2)
    assert not vocab.accepts(exactly_two, '<call>{"city": "A"}')
    assert vocab.accepts(exactly_two, '<call>{"city": "A"}<call>{"city": "B"}')


# -- what is refused, fast, with a message that names the reason ------------------------------
def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        (nested(200), "deeper than 24"),
        ({"type": "string", "pattern": "^(a+)+$"}, "(a+)+"),
        ({"type": "string", "pattern": "^(a*)*$"}, "(a+)+"),
        ({"type": "string", "pattern": "(a|aa)*b"}, "(a|aa)*"),
        ({"type": "string", "pattern": "^a{1,100000}$"}, "exceeds 128"),
        ({"type": "string", "pattern": "^(a{20}){20}$"}, "multiply to 400"),
        ({"type": "string", "pattern": "^(?=a)a$"}, "lookaround"),
        ({"type": "string", "pattern": "x" * 300}, "limit is 256"),
        ({"not": {"type": "string"}}, "'not'"),
        ({"type": "object", "patternProperties": {"^a": {}}}, "'patternProperties'"),
        ({"if": {}, "then": {}}, "'if'"),
        ({"type": "number", "minimum": 1}, "['minimum'] can be enforced only with type 'integer'"),
        ({"type": "integer", "multipleOf": 2}, "'multipleOf'"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems=true"),
        ({"type": "string", "format": "email"}, "format 'email'"),
        ({"$ref": "https://example.com/schema.json"}, "only local"),
        ({"type": "object", "properties": {"a": True}}, "boolean schemas"),
        ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "not listed"),
        ({"type": "array", "maxItems": 1000}, "maxItems must be"),
        ({"type": "string", "maxLength": 5, "pattern": "^a$"}, "cannot be combined"),
        ({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}, "cycle"),
        ({"anyOf": [{"type": f"t{i}"} for i in range(3)]}, "unknown type"),
    ],
)
def test_hostile_or_unsupported_schemas_are_refused(
    compiler: GrammarCompiler, schema: dict[str, Any], reason: str
) -> None:
    assert reason in refused(compiler, schema)


def test_size_node_and_grammar_limits(compiler: GrammarCompiler) -> None:
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(300)}}
    assert "limit is 1000" in refused(compiler, wide, GrammarLimits(max_schema_bytes=1000))
    assert "more than 100 subschemas" in refused(compiler, wide, GrammarLimits(max_nodes=100))
    assert "grammar; the limit is 2000" in refused(
        compiler, wide, GrammarLimits(max_grammar_bytes=2000)
    )


# -- integer bounds, and lenient mode for schemas written for validators ----------------------
@pytest.mark.parametrize(
    ("low", "high"),
    [(0, 0), (0, 9), (17, 234), (-234, -17), (-5, 5), (1, 1000), (99, 101), (-1, 0), (7, 10**5)],
)
def test_integer_range_gbnf_is_exactly_the_range(low: int, high: int) -> None:
    # The expression uses only quoted digits, classes, groups and {m,n}: read as a regex.
    regex = re.compile(integer_range_gbnf(low, high).replace(" ", "").replace('"', ""))
    for value in range(min(low, -1100), max(high, 1100) + 1):
        assert bool(regex.fullmatch(str(value))) == (low <= value <= high), value
    assert not any(regex.fullmatch(text) for text in ("-0", "00", "01", "+1", ""))


@pytest.mark.parametrize("lenient", [False, True])
def test_integer_bounds_are_enforced_in_both_modes(
    compiler: GrammarCompiler, vocab: Vocab, lenient: bool
) -> None:
    schema = {"type": "object", "required": ["n"], "properties": {
        "n": {"type": "integer", "minimum": -5, "exclusiveMaximum": 120}}}  # fmt: skip
    gbnf = compile_now(compiler, schema, lenient=lenient)
    for n in ("-5", "0", "7", "119"):
        assert vocab.accepts(gbnf, f'{{"n": {n}}}'), n
    for n in ("-6", "120", "1000", "-0", "007", "1.5"):
        assert not vocab.accepts(gbnf, f'{{"n": {n}}}'), n
    unbounded_above = compile_now(compiler, {"type": "integer", "exclusiveMinimum": 0})
    assert vocab.accepts(unbounded_above, "9" * 16)
    assert not vocab.accepts(unbounded_above, "0")


WILD_TOOL = {
    "type": "object",
    "properties": {
        "to": {"type": "string", "format": "email"},
        "site": {"type": "string", "format": "uri", "maxLength": 2048},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.1},
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "meta": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}},
    },
    "required": ["to", "ratio"],
    "additionalProperties": False,
}


def test_lenient_mode_drops_value_only_constraints(compiler: GrammarCompiler, vocab: Vocab) -> None:
    assert "'email' is not supported" in refused(compiler, WILD_TOOL)
    gbnf = compile_now(compiler, WILD_TOOL, lenient=True)
    # Required properties come first: the converter's order, not something lenient mode drops.
    valid = '{"to": "a@b.c", "ratio": 0.5, "site": "https://x.y", "tags": ["a"], "meta": {}}'
    assert vocab.accepts(gbnf, valid)
    assert vocab.accepts(gbnf, '{"to": "not an email", "ratio": 7}')  # what was dropped
    assert not vocab.accepts(gbnf, '{"to": "a@b.c"}')  # required still holds
    assert not vocab.accepts(gbnf, '{"to": "a@b.c", "ratio": "0.5"}')  # and types
    assert not vocab.accepts(gbnf, '{"to": "a@b.c", "ratio": 1, "x": 1}')
    assert not vocab.accepts(gbnf, '{"to": "a@b.c", "ratio": 1, "meta": {"k": 1}}')


@pytest.mark.parametrize(
    ("schema", "limits", "reason"),
    [
        ({"type": "object", "patternProperties": {"^a": {}}}, LIMITS, "'patternProperties'"),
        ({"not": {"type": "string"}}, LIMITS, "'not'"),
        ({"type": "string", "pattern": "^(a+)+$", "maxLength": 9}, LIMITS, "(a+)+"),
        ({"type": "integer", "minimum": 5, "maximum": 4}, LIMITS, "no integer"),
        ({"type": "array", "maxItems": -1}, LIMITS, "maxItems must be"),
        (nested(30), LIMITS, "deeper than 24"),
        (WILD_TOOL, GrammarLimits(max_nodes=3), "more than 3 subschemas"),
        (WILD_TOOL, GrammarLimits(max_schema_bytes=100), "limit is 100"),
    ],
)
def test_lenient_mode_still_refuses_structure_and_limits(
    compiler: GrammarCompiler, schema: dict[str, Any], limits: GrammarLimits, reason: str
) -> None:
    assert reason in refused(compiler, schema, limits, lenient=True)


# -- the worker process: deadline, recovery, reuse, concurrency -------------------------------
def test_a_slow_conversion_is_killed_and_the_next_request_still_works(
    compiler: GrammarCompiler, vocab: Vocab
) -> None:
    wide = {"type": "object", "properties": {f"p{i}": nested(5) for i in range(200)}}

    async def scenario() -> str:
        with pytest.raises(InvalidRequestError, match="took longer than 1e-06s"):
            await compiler.compile(wide, GrammarLimits(compile_timeout_s=1e-6))
        return await compiler.compile(wide, LIMITS)

    assert vocab.parses(asyncio.run(scenario()))


def test_workers_are_reused_and_bounded(compiler: GrammarCompiler) -> None:
    schemas = [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}} for i in range(8)]

    async def scenario() -> list[str]:
        await compiler.compile(WEATHER, LIMITS)
        started = time.monotonic()
        texts = await asyncio.gather(*(compiler.compile(s, LIMITS) for s in schemas))
        assert time.monotonic() - started < 5
        return list(texts)

    texts = asyncio.run(scenario())
    assert all(f'"\\"k{i}\\""' in text for i, text in enumerate(texts))
    assert len(compiler._idle) == 2  # never more processes than max_workers


def test_a_cancelled_request_leaves_the_pool_usable(compiler: GrammarCompiler) -> None:
    async def scenario() -> str:
        task = asyncio.create_task(compiler.compile(WEATHER, LIMITS))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await compiler.compile(WEATHER, LIMITS)

    assert "root ::=" in asyncio.run(scenario())


# -- is it a JSON Schema at all ----------------------------------------------------------------
def test_check_json_schema() -> None:
    for schema in SUPPORTED:
        check_json_schema(schema, param="tools[0].function.parameters")
    with pytest.raises(InvalidRequestError, match="invalid JSON Schema at type") as info:
        check_json_schema({"type": 12}, param="tools[0].function.parameters")
    assert info.value.param == "tools[0].function.parameters"
