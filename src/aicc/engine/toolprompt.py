"""Asking for tool calls: the system prompt that teaches the call format, and the grammar spec
that forces a call when `tool_choice` requires one. The formats and their parser are in
`aicc.engine.toolcalls`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aicc.engine.toolcalls import (
    DS_CALL_BEGIN,
    DS_CALL_END,
    DS_CALLS_BEGIN,
    DS_CALLS_END,
    DS_SEP,
    HERMES_CLOSE,
    HERMES_OPEN,
    check_format,
)
from aicc.errors import InvalidRequestError

ANY_TOOL = "*"
"""`tool_system_prompt(required=ANY_TOOL)`: some call is required (tool_choice "required")."""
MAX_PARALLEL_CALLS = 8


@dataclass(frozen=True, slots=True)
class CallGrammarSpec:
    """What the grammar compiler needs to force tool calls: `min_count`..`max_count` JSON values
    matching `schema`, each wrapped in `prefix`/`suffix`, joined by `separator`."""

    schema: dict[str, Any]
    prefix: str
    suffix: str
    min_count: int
    max_count: int
    separator: str


def tool_system_prompt(tools: list[dict[str, Any]], fmt: str, *, required: str | None) -> str:
    """Instructions for templates that do not render `tools`: the signatures and the call format.

    `required`: None lets the model choose, `ANY_TOOL` demands some call, a function name
    demands that call. Raises `InvalidRequestError` for malformed tools or an unknown name, and
    `ValueError` for an unknown `fmt`.
    """
    functions = _functions(tools)
    signatures = "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
    if check_format(fmt) == "hermes":
        how = (
            "To call a function, write a JSON object with its name and arguments between "
            "<tool_call> and </tool_call> tags, one block per call:\n"
            '<tool_call>\n{"name": "<function name>", "arguments": {<arguments>}}\n</tool_call>'
        )
    else:
        how = (
            "To call functions, write them in this exact format, one block per call:\n"
            f"{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}<function name>\n"
            f"```json\n{{<arguments>}}\n```{DS_CALL_END}{DS_CALLS_END}"
        )
    if required is None:
        when = "Call a function only when it helps; otherwise answer directly."
    elif required == ANY_TOOL:
        when = "You must call at least one of these functions now instead of answering directly."
    elif required in {f["name"] for f in functions}:
        when = f"You must call the function `{required}` now."
    else:
        raise InvalidRequestError(
            f"tool_choice names unknown function {required!r}.", param="tool_choice"
        )
    return (
        "# Tools\n\nYou can call these functions (JSON signatures, one per line):\n"
        f"{signatures}\n\n{how}\nThe arguments must be a JSON object matching the function's "
        f"parameters.\n{when}"
    )


def required_call_spec(
    tools: list[dict[str, Any]],
    tool_choice: str | dict[str, Any],
    parallel_tool_calls: bool,
    fmt: str,
) -> CallGrammarSpec:
    """The grammar spec that forces the calls `tool_choice` ("required" or a named function) asks.

    Hermes: each value is `{"name": <const>, "arguments": <that function's parameters>}`, one
    `anyOf` branch per allowed function, inside `<tool_call>` tags.

    Deepseek: the name sits outside the JSON (between `<｜tool▁sep｜>` and the json fence), and
    the compiler wraps every value in one fixed prefix, so a grammar can pin the name only when
    exactly one function is allowed: then the values are its bare parameters inside the native
    call tokens (the section tokens included for a single call; for parallel calls, whose
    prefix repeats, each call goes without the section tokens, which the parser does not need).
    With several candidate functions we fall back to the hermes shape, which the deepseek parser
    also accepts: a format the model was not trained on, but a correct, parseable call beats
    one the grammar cannot express.

    Raises `InvalidRequestError` for malformed tools or an unknown named function, and
    `ValueError` for a `tool_choice` that forces nothing ("auto", "none") or an unknown `fmt`.
    """
    functions = _functions(tools)
    check_format(fmt)
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise InvalidRequestError(
                f"tool_choice names unknown function {name!r}.", param="tool_choice"
            )
    elif tool_choice != "required":
        raise ValueError(f"tool_choice {tool_choice!r} does not force a call")
    max_count = MAX_PARALLEL_CALLS if parallel_tool_calls else 1
    if fmt == "deepseek" and len(functions) == 1:
        fn = functions[0]
        call_prefix = f"{DS_CALL_BEGIN}function{DS_SEP}{fn['name']}\n```json\n"
        call_suffix = f"\n```{DS_CALL_END}"
        if max_count == 1:
            call_prefix, call_suffix = DS_CALLS_BEGIN + call_prefix, call_suffix + DS_CALLS_END
        return CallGrammarSpec(_parameters(fn), call_prefix, call_suffix, 1, max_count, "\n")
    branches = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": _parameters(f)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return CallGrammarSpec(
        {"anyOf": branches}, HERMES_OPEN + "\n", "\n" + HERMES_CLOSE, 1, max_count, "\n"
    )


def _functions(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `function` objects of OpenAI-style tools. Raises `InvalidRequestError` if malformed."""
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type", "function") != "function"
            or not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
            or not fn["name"]
        ):
            raise InvalidRequestError(
                f"tools[{i}] must be a function tool with a name.", param=f"tools[{i}]"
            )
        functions.append(fn)
    return functions


def _parameters(fn: dict[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object"}
