"""Built-in chat templates against the reference strings of each model family."""

import pytest

from aicc.engine.chat import ChatRenderer
from aicc.engine.types import ModelInfo
from aicc.errors import InvalidRequestError


def make_info(architecture: str, template: str | None = None) -> ModelInfo:
    return ModelInfo(
        name="m",
        path="/m.gguf",
        architecture=architecture,
        max_context=1024,
        vocab_size=1000,
        chat_template=template,
        bos_token="<bos>" if architecture.startswith("gemma") else "<|begin_of_text|>",
        eos_token="<eos>",
    )


def test_gemma_reference_prompt() -> None:
    renderer = ChatRenderer(make_info("gemma3"))
    prompt = renderer.render(
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ]
    )
    assert prompt == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert renderer.template_name == "gemma"


def test_gemma_without_system_and_without_generation_prompt() -> None:
    renderer = ChatRenderer(make_info("gemma3"))
    prompt = renderer.render([{"role": "user", "content": " Hi "}], add_generation_prompt=False)
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n"


def test_chatml_fallback_for_unknown_architecture() -> None:
    renderer = ChatRenderer(make_info("qwen2"))
    prompt = renderer.render([{"role": "user", "content": "Hi"}])
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_llama3_reference_prompt() -> None:
    renderer = ChatRenderer(make_info("llama"))
    prompt = renderer.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_gguf_template_wins_and_is_sandboxed() -> None:
    renderer = ChatRenderer(make_info("gemma3", "{{ messages[0]['content'] | upper }}"))
    assert renderer.render([{"role": "user", "content": "x"}]) == "X"
    assert renderer.template_name == "gguf"
    hostile = ChatRenderer(make_info("llama", "{{ ''.__class__.__mro__[1].__subclasses__() }}"))
    with pytest.raises(InvalidRequestError):
        hostile.render([{"role": "user", "content": "x"}])


def test_template_rejection_is_a_client_error() -> None:
    renderer = ChatRenderer(make_info("gemma3"))
    with pytest.raises(InvalidRequestError, match="not tool"):
        renderer.render([{"role": "tool", "content": "x"}])


HERMES_TEMPLATE = (
    "{% for tool in tools or [] %}{{ tool['function']['name'] | tojson }};{% endfor %}"
    "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}:{{ 'tool_calls' in m }}]"
    "{% endfor %}{% if add_generation_prompt %}<tool_call>?{% endif %}"
)


def test_tools_reach_the_template_and_absent_tool_calls_are_absent() -> None:
    renderer = ChatRenderer(make_info("qwen2", HERMES_TEMPLATE))
    tools = [{"type": "function", "function": {"name": "f<x>", "parameters": {}}}]
    messages = [{"role": "user", "content": "hi", "tool_calls": None}]
    assert renderer.render(messages, tools=tools) == '"f<x>";[user:hi:False]<tool_call>?'
    assert renderer.supports_tools
    assert renderer.tool_call_format == "hermes"
    assert not renderer.starts_in_reasoning


def test_builtin_without_tools_support() -> None:
    renderer = ChatRenderer(make_info("qwen2"))
    assert not renderer.supports_tools
    assert renderer.tool_call_format == "hermes"


def test_python_errors_inside_a_template_are_client_errors() -> None:
    # Official templates concatenate with `+`, which raises TypeError on a missing content.
    renderer = ChatRenderer(make_info("qwen2", "{{ 'x' + messages[0]['content'] }}"))
    with pytest.raises(InvalidRequestError, match="rejected"):
        renderer.render([{"role": "user", "content": None}])


def test_reasoning_prompt_is_detected_from_the_rendered_prompt() -> None:
    template = "{{ messages[0]['content'] }}{% if add_generation_prompt %}<think>\n{% endif %}"
    assert ChatRenderer(make_info("qwen2", template)).starts_in_reasoning
