"""Tool-call parsing (Hermes and DeepSeek formats), whatever the stream's chunking."""

import re

import pytest

from aicc.engine.toolcalls import (
    DS_CALL_BEGIN,
    DS_CALL_END,
    DS_CALLS_BEGIN,
    DS_CALLS_END,
    DS_SEP,
    ToolCallParser,
)
from tests.engine.chunkings import chunkings

NAMES = {"get_weather", "add", "noop"}


def hermes(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def ds_call(name: str, arguments: str) -> str:
    return f"{DS_CALL_BEGIN}function{DS_SEP}{name}\n```json\n{arguments}\n```{DS_CALL_END}"


def ds_v31_call(name: str, arguments: str) -> str:
    return f"{DS_CALL_BEGIN}{name}{DS_SEP}{arguments}{DS_CALL_END}"


def parse(fmt: str, pieces: list[str]) -> tuple[str, list[tuple[int, str, str]]]:
    parser = ToolCallParser(fmt, NAMES)
    deltas = [parser.push(piece) for piece in pieces] + [parser.flush()]
    calls = [call for delta in deltas for call in delta.tool_calls]
    for call in calls:
        assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)
    assert len({call.id for call in calls}) == len(calls)
    return "".join(d.content for d in deltas), [(c.index, c.name, c.arguments) for c in calls]


WEATHER = (0, "get_weather", '{"city":"Paris"}')
BAD_JSON = hermes("get_weather", '{"city": "Paris"')
UNKNOWN = hermes("launch_rockets", "{}")
CASES = [
    # (fmt, output, content, calls)
    ("hermes", hermes("get_weather", '{"city": "Paris"}'), "", [WEATHER]),
    (
        "hermes",
        "Checking.\n\n" + hermes("get_weather", '{"city": "Paris"}') + "\n",
        "Checking.",
        [WEATHER],
    ),
    (
        "hermes",
        hermes("get_weather", '{"city": "Paris"}') + "\n" + hermes("add", '{"a": 1, "b": [2]}'),
        "",
        [WEATHER, (1, "add", '{"a":1,"b":[2]}')],
    ),
    (
        "hermes",
        "No tools needed. 2 < 3 and <b>bold</b>.  ",
        "No tools needed. 2 < 3 and <b>bold</b>.  ",
        [],
    ),
    (
        "hermes",
        hermes("get_weather", '{"city": "Zürich 🌧"}'),
        "",
        [(0, "get_weather", '{"city":"Zürich 🌧"}')],
    ),
    (
        "hermes",
        '<tool_call>{"name": "noop", "arguments": "{\\"x\\": 1}"}</tool_call>',
        "",
        [(0, "noop", '{"x":1}')],
    ),
    (
        "hermes",
        '<tool_call>{"name": "noop", "parameters": {}}</tool_call>',
        "",
        [(0, "noop", "{}")],
    ),
    ("hermes", BAD_JSON, BAD_JSON, []),
    ("hermes", UNKNOWN, UNKNOWN, []),
    ("hermes", hermes("add", "[1, 2]"), hermes("add", "[1, 2]"), []),
    ("hermes", hermes("add", '{"x": NaN}'), hermes("add", '{"x": NaN}'), []),
    ("hermes", "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    (
        "hermes",
        UNKNOWN + "\n" + hermes("noop", "{}") + "\nDone.",
        UNKNOWN + "Done.",
        [(0, "noop", "{}")],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "add", "arguments": {',
        '<tool_call>\n{"name": "add", "arguments": {',
        [],
    ),
    ("hermes", "text <tool_c", "text <tool_c", []),
    ("hermes", "", "", []),
    (
        "deepseek",
        DS_CALLS_BEGIN + ds_call("get_weather", '{"city": "Paris"}') + DS_CALLS_END,
        "",
        [WEATHER],
    ),
    (
        "deepseek",
        "Let me look.\n"
        + DS_CALLS_BEGIN
        + ds_call("get_weather", '{"city": "Paris"}')
        + "\n"
        + ds_call("add", '{"a": 1}')
        + DS_CALLS_END,
        "Let me look.",
        [WEATHER, (1, "add", '{"a":1}')],
    ),
    (
        "deepseek",
        DS_CALLS_BEGIN + ds_v31_call("get_weather", '{"city": "Paris"}') + DS_CALLS_END,
        "",
        [WEATHER],
    ),
    (
        "deepseek",
        DS_CALLS_BEGIN + ds_call("launch", "{}") + ds_call("noop", "{}") + DS_CALLS_END,
        DS_CALLS_BEGIN + ds_call("launch", "{}"),
        [(0, "noop", "{}")],
    ),
    (
        "deepseek",
        DS_CALLS_BEGIN + ds_call("noop", "{oops") + DS_CALLS_END,
        DS_CALLS_BEGIN + ds_call("noop", "{oops") + DS_CALLS_END,
        [],
    ),
    (
        "deepseek",
        DS_CALLS_BEGIN + ds_call("noop", "{}") + "\nAfter the calls.",
        "After the calls.",
        [(0, "noop", "{}")],
    ),
    ("deepseek", DS_CALLS_BEGIN + "oops", DS_CALLS_BEGIN + "oops", []),
    (
        "deepseek",
        DS_CALLS_BEGIN + DS_CALL_BEGIN + "function" + DS_SEP + "noop\n```json\n{}",
        DS_CALLS_BEGIN + DS_CALL_BEGIN + "function" + DS_SEP + "noop\n```json\n{}",
        [],
    ),
    ("deepseek", ds_call("noop", "{}"), "", [(0, "noop", "{}")]),
    ("deepseek", hermes("get_weather", '{"city": "Paris"}'), "", [WEATHER]),
    ("deepseek", "答え：<｜ not a tag", "答え：<｜ not a tag", []),
]


@pytest.mark.parametrize(("fmt", "output", "content", "calls"), CASES)
def test_parse_is_the_same_for_every_chunking(
    fmt: str, output: str, content: str, calls: list[tuple[int, str, str]]
) -> None:
    for pieces in chunkings(output):
        assert parse(fmt, pieces) == (content, calls), pieces


def test_content_before_a_call_streams_at_once_and_a_partial_tag_is_held() -> None:
    parser = ToolCallParser("hermes", NAMES)
    assert parser.push("I will check").content == "I will check"
    assert parser.push(" the weather.\n<tool").content == " the weather."
    delta = parser.push('_call>\n{"name": "noop", "arguments": {}}\n</tool_call>')
    assert delta.content == ""
    assert [(c.index, c.name, c.arguments) for c in delta.tool_calls] == [(0, "noop", "{}")]
    assert parser.flush().content == ""


def test_a_call_is_emitted_only_once_its_block_is_complete() -> None:
    parser = ToolCallParser("hermes", NAMES)
    assert (
        parser.push('<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_cal').tool_calls == ()
    )
    assert len(parser.push("l>").tool_calls) == 1


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="format"):
        ToolCallParser("xml", NAMES)
