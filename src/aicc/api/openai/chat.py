"""Chat completions: messages and tools into a prompt, a grammar when output is constrained,
and generated text back into reasoning, content and tool calls."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aicc.api.openai.chat_output import ChatDelta, ChatOutputProcessor, delta_json, message_json
from aicc.api.openai.logprobs import chat_logprobs
from aicc.api.openai.protocol import ChatCompletionRequest, ChatMessage
from aicc.api.openai.serving import (
    Collected,
    Json,
    Metering,
    OpenAIServing,
    PreparedRequest,
    finish_reason_json,
    off_loop_if_large,
)
from aicc.engine.chat import ChatRenderer
from aicc.engine.grammar import GrammarCompiler, GrammarLimits, check_json_schema
from aicc.engine.toolcalls import ToolCallParser
from aicc.engine.toolprompt import ANY_TOOL, required_call_spec, tool_system_prompt
from aicc.engine.types import TokenEvent
from aicc.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class ChatPlan:
    """How this request's generated text becomes chat output."""

    reasoning: bool
    starts_in_reasoning: bool
    tool_format: str | None
    """None: the output is not parsed for tool calls."""
    tool_names: frozenset[str]

    def processor(self) -> ChatOutputProcessor:
        parser = None
        if self.tool_format is not None:
            parser = ToolCallParser(self.tool_format, set(self.tool_names))
        return ChatOutputProcessor(self.reasoning, self.starts_in_reasoning, parser)


class ChatServing:
    """`/v1/chat/completions` on top of the shared `OpenAIServing`."""

    def __init__(
        self,
        core: OpenAIServing,
        compiler: GrammarCompiler,
        *,
        reasoning_parser: str,
        grammar_limits: GrammarLimits | None = None,
    ) -> None:
        self.core = core
        self.renderer = ChatRenderer(core.engine.model_info)
        self.compiler = compiler
        self.grammar_limits = grammar_limits or GrammarLimits()
        renderer = self.renderer
        self.reasoning = reasoning_parser == "deepseek_r1" or (
            reasoning_parser == "auto" and (renderer.starts_in_reasoning or renderer.mentions_think)
        )

    async def start(
        self, body: ChatCompletionRequest, scope: str, metering: Metering | None = None
    ) -> tuple[PreparedRequest, ChatPlan]:
        self.core.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        tools = self._tools(body)
        plan = ChatPlan(
            reasoning=self.reasoning,
            starts_in_reasoning=self.renderer.starts_in_reasoning,
            tool_format=self.renderer.tool_call_format if tools else None,
            tool_names=frozenset(tool["function"]["name"] for tool in tools),
        )
        messages = self._messages(body, tools)
        size = sum(len(str(message.get("content") or "")) for message in messages)
        native_tools = tools if tools and self.renderer.supports_tools else None
        token_ids = await off_loop_if_large(size, self._render_and_tokenize, messages, native_tools)
        grammar = await self._grammar(body, tools)
        params = self.core.sampling_params(
            body,
            body.completion_limit,
            num_top_logprobs=body.num_top_logprobs,
            grammar=grammar,
            render_special=plan.reasoning or plan.tool_format is not None,
        )
        return self.core.start("chatcmpl", body, token_ids, params, scope, metering), plan

    def response(self, prepared: PreparedRequest, plan: ChatPlan, collected: Collected) -> Json:
        choices = []
        for result in collected.choices:
            processor = plan.processor()
            deltas = [processor.push(result.text), processor.finish()]
            finish = finish_reason_json(result.finish_reason)
            choices.append(
                {
                    "index": result.index,
                    "message": message_json(deltas),
                    "logprobs": chat_logprobs(result.logprobs) if prepared.wants_logprobs else None,
                    "finish_reason": "tool_calls" if processor.has_tool_calls else finish,
                }
            )
        return self.core.envelope(prepared, "chat.completion", choices, collected.usage)

    async def chunks(self, prepared: PreparedRequest, plan: ChatPlan) -> AsyncIterator[list[Json]]:
        """The stream's chunks; those ready together in one list (they leave in one write)."""
        kind = "chat.completion.chunk"
        processors = [plan.processor() for _ in range(prepared.num_choices)]
        role = {"role": "assistant", "content": ""}
        yield [
            self.core.chunk(
                prepared, kind, {"index": i, "delta": role, "logprobs": None, "finish_reason": None}
            )
            for i in range(prepared.num_choices)
        ]
        async for event, usage in self.core.stream_events(prepared):
            choice = None
            if event is not None:
                choice = _choice_json(processors[event.index], event, prepared.wants_logprobs)
            if ready := self.core.ready_chunks(prepared, kind, choice, usage):
                yield ready

    # -- helpers ---------------------------------------------------------------------------
    def _render_and_tokenize(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> list[int]:
        # The template writes the BOS token itself.
        prompt = self.renderer.render(messages, tools=tools)
        return self.core.engine.tokenize(prompt, add_special=False)

    def _tools(self, body: ChatCompletionRequest) -> list[dict[str, Any]]:
        """The tool definitions the model sees (none with tool_choice "none")."""
        if not body.tools:
            if body.tool_choice not in (None, "none", "auto"):
                raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
            return []
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
        for index, tool in enumerate(tools):
            parameters = tool["function"].get("parameters")
            if parameters is not None:
                check_json_schema(parameters, param=f"tools[{index}].function.parameters")
        names = [tool["function"]["name"] for tool in tools]
        if len(set(names)) != len(names):
            raise InvalidRequestError("tool function names must be unique", param="tools")
        return [] if body.tool_choice == "none" else tools

    def _messages(self, body: ChatCompletionRequest, tools: list[dict[str, Any]]) -> list[Json]:
        native = self.renderer.supports_tools
        messages = [_message_dict(message, native) for message in body.messages]
        if tools and not native:
            prompt = tool_system_prompt(tools, "hermes", required=_required(body))
            if messages[0]["role"] == "system":
                messages[0]["content"] = f"{messages[0]['content']}\n\n{prompt}".lstrip()
            else:
                messages.insert(0, {"role": "system", "content": prompt})
        return messages

    async def _grammar(
        self, body: ChatCompletionRequest, tools: list[dict[str, Any]]
    ) -> str | None:
        limits = self.grammar_limits
        if tools and _required(body) is not None:
            fmt = self.renderer.tool_call_format if self.renderer.supports_tools else "hermes"
            choice: str | dict[str, Any] = (
                body.tool_choice.model_dump()  # type: ignore[union-attr]
                if _required(body) != ANY_TOOL
                else "required"
            )
            spec = required_call_spec(tools, choice, body.parallel_tool_calls, fmt)
            return await self.compiler.compile(
                spec.schema,
                limits,
                param="tools",
                prefix=spec.prefix,
                suffix=spec.suffix,
                min_count=spec.min_count,
                max_count=spec.max_count,
                separator=spec.separator,
                lenient=True,
            )
        response_format = body.response_format
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return await self.compiler.compile(None, limits)
        if response_format.json_schema is None or response_format.json_schema.schema_ is None:
            raise InvalidRequestError(
                "response_format json_schema needs json_schema.schema", param="response_format"
            )
        schema = response_format.json_schema.schema_
        check_json_schema(schema, param="response_format.json_schema.schema")
        return await self.compiler.compile(schema, limits)


def _required(body: ChatCompletionRequest) -> str | None:
    """None: the model may answer without a call; `ANY_TOOL` or a name: a call is required."""
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        return ANY_TOOL if choice == "required" else None
    return choice.function.name


def _message_dict(message: ChatMessage, native_tools: bool) -> Json:
    """A message as templates take it. For templates without tool support, earlier calls and
    their results are written in the Hermes format the injected instructions describe."""
    # OpenAI's "developer" role is the newer name for "system".
    role = "system" if message.role == "developer" else message.role
    shaped: Json = {"role": role, "content": message.text}
    calls = [call.model_dump() for call in message.tool_calls or []]
    if native_tools:
        if calls:
            shaped["tool_calls"] = calls
        if message.tool_call_id is not None:
            shaped["tool_call_id"] = message.tool_call_id
        return shaped
    if calls:
        blocks = [
            "<tool_call>\n"
            + json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)})
            + "\n</tool_call>"
            for c in calls
        ]
        shaped["content"] = "\n".join(filter(None, [message.text, *blocks]))
    if role == "tool":
        shaped = {"role": "user", "content": f"<tool_response>\n{message.text}\n</tool_response>"}
    return shaped


def _arguments(call: Json) -> Any:
    text = call["function"]["arguments"]
    try:
        return json.loads(text)
    except ValueError:
        return text


def _choice_json(
    processor: ChatOutputProcessor, event: TokenEvent, wants_logprobs: bool
) -> Json | None:
    """A streamed chunk's choice for `event` (None when it adds nothing to show)."""
    delta = processor.push(event.text)
    finish = finish_reason_json(event.finish_reason)
    if event.finish_reason is not None:
        delta = _merge(delta, processor.finish())
        finish = "tool_calls" if processor.has_tool_calls else finish
    if delta.is_empty and finish is None and not event.logprobs:
        return None
    return {
        "index": event.index,
        "delta": delta_json(delta),
        "logprobs": chat_logprobs(event.logprobs) if wants_logprobs else None,
        "finish_reason": finish,
    }


def _merge(first: ChatDelta, second: ChatDelta) -> ChatDelta:
    return ChatDelta(
        first.reasoning_content + second.reasoning_content,
        first.content + second.content,
        first.tool_calls + second.tool_calls,
    )
