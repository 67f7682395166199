"""Chat templates: the model's own (from GGUF metadata) or a built-in one for its architecture,
always rendered in a sandboxed, immutable Jinja environment."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib.resources import files
from typing import NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from aicc.engine.types import ModelInfo
from aicc.errors import InvalidRequestError

BUILTIN_BY_ARCHITECTURE = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "llama": "llama3",
}
"""Architectures whose GGUF may lack a template; anything else falls back to ChatML."""

DEFAULT_BUILTIN = "chatml"


def builtin_template(name: str) -> str:
    return files("aicc.engine").joinpath("templates", f"{name}.jinja").read_text("utf-8")


class ChatRenderer:
    """Renders OpenAI-style messages into one prompt string for a model."""

    def __init__(self, info: ModelInfo) -> None:
        if info.chat_template:
            source, self.template_name = info.chat_template, "gguf"
        else:
            self.template_name = BUILTIN_BY_ARCHITECTURE.get(info.architecture, DEFAULT_BUILTIN)
            source = builtin_template(self.template_name)
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, autoescape=False
        )
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        self._template = environment.from_string(source)
        self._bos_token = info.bos_token
        self._eos_token = info.eos_token

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Raises `InvalidRequestError` when the template rejects the conversation."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(
                f"the chat template rejected these messages: {exc}", param="messages"
            ) from None


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now(UTC).strftime(fmt)
