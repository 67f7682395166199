"""Chat templates: the model's own (from GGUF metadata) or a built-in one for its family,
always rendered in a sandboxed, immutable Jinja environment."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any, Literal, NoReturn

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from aicc.engine.types import ModelInfo
from aicc.errors import InvalidRequestError

BUILTIN_BY_ARCHITECTURE = {
    "deepseek2": "deepseek-v3",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "llama": "llama3",
}
"""Architectures whose GGUF may lack a template; anything else falls back to ChatML.
`builtin_template_name` refines this by the model's name where one architecture hosts
several families (DeepSeek V2 / V3 / R1, the R1 distills of Qwen2 and Llama)."""

DEFAULT_BUILTIN = "chatml"

DEEPSEEK_TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"

ToolCallFormat = Literal["deepseek", "hermes"]

# Name patterns match whole version tags ("V2" but not "V2.5", which uses V3's format).
_V2_NAME = re.compile(r"(?<![a-z0-9])v2(?![.\d])", re.IGNORECASE)
_R1_NAME = re.compile(r"(?<![a-z0-9])r1(?!\d)", re.IGNORECASE)
_R1_DISTILL_NAME = re.compile(r"(?<![a-z0-9])r1[-_ ]distill", re.IGNORECASE)

# What a template can raise on odd messages: its own `raise_exception`, sandbox refusals, and
# plain Python errors from expressions like `'x' + none` inside official templates.
_TEMPLATE_FAILURES = (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError)


def builtin_template(name: str) -> str:
    return files("aicc.engine").joinpath("templates", f"{name}.jinja").read_text("utf-8")


def builtin_template_name(info: ModelInfo) -> str:
    """The built-in template for a model whose GGUF carries none."""
    name = info.general_name
    if info.architecture == "deepseek2":
        if _V2_NAME.search(name):
            return "deepseek-v2"
        return "deepseek-r1" if _R1_NAME.search(name) else "deepseek-v3"
    if info.architecture in ("qwen2", "llama") and _R1_DISTILL_NAME.search(name):
        return "deepseek-r1"
    return BUILTIN_BY_ARCHITECTURE.get(info.architecture, DEFAULT_BUILTIN)


class ChatRenderer:
    """Renders OpenAI-style messages (and tool definitions) into one prompt string."""

    def __init__(self, info: ModelInfo) -> None:
        if info.chat_template:
            source, self.template_name = info.chat_template, "gguf"
        else:
            self.template_name = builtin_template_name(info)
            source = builtin_template(self.template_name)
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, autoescape=False
        )
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        environment.filters["tojson"] = _tojson
        self._template = environment.from_string(source)
        self._bos_token = info.bos_token
        self._eos_token = info.eos_token
        self.supports_tools = "tools" in meta.find_undeclared_variables(environment.parse(source))
        """The template renders tool definitions (it reads the `tools` variable)."""
        self.tool_call_format: ToolCallFormat = (
            "deepseek" if DEEPSEEK_TOOL_CALLS_BEGIN in source else "hermes"
        )
        """How the model writes tool calls: DeepSeek's special tokens, or Hermes-style
        `<tool_call>{json}</tool_call>` (Qwen, Llama 3 and most others)."""
        self.mentions_think = "<think>" in source
        """The template knows `<think>` reasoning blocks (DeepSeek-R1, QwQ, Qwen3...)."""
        self.starts_in_reasoning = self._generation_prompt_opens_think()
        """The generation prompt ends inside an open `<think>`: the reply starts with
        reasoning, and its `</think>` comes before the answer."""

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render `messages` (OpenAI chat shape: role, content, tool_calls, tool_call_id).

        Raises `InvalidRequestError` when the template rejects the conversation.
        """
        try:
            return self._template.render(
                messages=[_normalized(message) for message in messages],
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
            )
        except _TEMPLATE_FAILURES as exc:
            raise InvalidRequestError(
                f"the chat template rejected these messages: {exc}", param="messages"
            ) from None

    def _generation_prompt_opens_think(self) -> bool:
        try:
            probe = self.render([{"role": "user", "content": "x"}])
        except InvalidRequestError:  # a template that insists on a system prompt, say
            return False
        return probe.endswith(("<think>", "<think>\n"))


def _normalized(message: Mapping[str, Any]) -> dict[str, Any]:
    """Shape a message the way official templates test it.

    DeepSeek's templates tell tool-call turns apart by `'tool_calls' in message` (R1) or by
    `content is none` (V3), so an absent tool-call list must be an absent key, and the content
    of a tool-call turn without text must be None rather than "" or missing.
    """
    shaped = {key: value for key, value in message.items() if value is not None}
    if not shaped.get("tool_calls"):
        shaped.pop("tool_calls", None)
    elif not shaped.get("content"):
        shaped["content"] = None
    return shaped


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now(UTC).strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """`tojson` as Hugging Face templates expect it: plain JSON, no HTML escaping of <>&'."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
