from __future__ import annotations

import json
from typing import Any

import pytest

from aicc.engine.toolcalls import DS_CALL_BEGIN, ToolCallParser
from aicc.engine.toolprompt import ANY_TOOL, required_call_spec, tool_system_prompt
from aicc.errors import InvalidRequestError

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "noop"}},
]


def parse(fmt: str, text: str) -> list[tuple[str, str]]:
    """(name, arguments) of the calls the real parser finds in `text`; no content may be left."""
    parser = ToolCallParser(fmt, {"get_weather", "noop"})
    deltas = [parser.push(text), parser.flush()]
    assert "".join(d.content for d in deltas) == ""
    return [(c.name, c.arguments) for d in deltas for c in d.tool_calls]


@pytest.mark.parametrize("fmt", ["hermes", "deepseek"])
def test_system_prompt_lists_signatures_and_the_format(fmt: str) -> None:
    prompt = tool_system_prompt(TOOLS, fmt, required=None)
    assert json.dumps(TOOLS[0]["function"]) in prompt
    assert ("<tool_call>" in prompt) == (fmt == "hermes")
    assert (DS_CALL_BEGIN in prompt) == (fmt == "deepseek")
    assert "You must call" not in prompt


def test_system_prompt_says_when_a_call_is_required() -> None:
    assert "at least one" in tool_system_prompt(TOOLS, "hermes", required=ANY_TOOL)
    assert "`noop`" in tool_system_prompt(TOOLS, "hermes", required="noop")
    with pytest.raises(InvalidRequestError) as excinfo:
        tool_system_prompt(TOOLS, "hermes", required="missing")
    assert excinfo.value.param == "tool_choice"


def test_malformed_tools_are_invalid_requests() -> None:
    with pytest.raises(InvalidRequestError) as excinfo:
        tool_system_prompt([{"type": "function", "function": {}}], "hermes", required=None)
    assert excinfo.value.param == "tools[0]"


def test_required_spec_for_hermes_allows_every_function() -> None:
    spec = required_call_spec(TOOLS, "required", True, "hermes")
    assert (spec.prefix, spec.suffix, spec.separator) == ("<tool_call>\n", "\n</tool_call>", "\n")
    assert (spec.min_count, spec.max_count) == (1, 8)
    branches = spec.schema["anyOf"]
    assert [b["properties"]["name"] for b in branches] == [
        {"const": "get_weather"},
        {"const": "noop"},
    ]
    assert branches[0]["properties"]["arguments"] == TOOLS[0]["function"]["parameters"]
    assert branches[1]["properties"]["arguments"] == {"type": "object"}
    assert all(b["required"] == ["name", "arguments"] for b in branches)


def test_required_spec_for_a_named_function() -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    spec = required_call_spec(TOOLS, choice, False, "hermes")
    assert len(spec.schema["anyOf"]) == 1
    assert spec.max_count == 1
    with pytest.raises(InvalidRequestError):
        required_call_spec(TOOLS, {"type": "function", "function": {"name": "x"}}, False, "hermes")
    with pytest.raises(ValueError, match="auto"):
        required_call_spec(TOOLS, "auto", False, "hermes")


def test_deepseek_spec_with_a_fixed_name_uses_the_native_tokens() -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    spec = required_call_spec(TOOLS, choice, False, "deepseek")
    assert spec.schema == TOOLS[0]["function"]["parameters"]
    # What the grammar would produce must parse back into the call.
    text = spec.prefix + '{"city":"Oslo"}' + spec.suffix
    assert parse("deepseek", text) == [("get_weather", '{"city":"Oslo"}')]
    parallel = required_call_spec(TOOLS, choice, True, "deepseek")
    text = parallel.separator.join(parallel.prefix + "{}" + parallel.suffix for _ in range(3))
    assert [name for name, _ in parse("deepseek", text)] == ["get_weather"] * 3


def test_deepseek_spec_with_a_choice_of_names_falls_back_to_hermes() -> None:
    spec = required_call_spec(TOOLS, "required", False, "deepseek")
    assert spec.prefix == "<tool_call>\n"
    text = spec.prefix + '{"name":"noop","arguments":{}}' + spec.suffix
    assert parse("deepseek", text) == [("noop", "{}")]
