"""DeepSeek chat templates: built-ins against literal reference strings, and against the
official templates (rendered through the same sandbox, as when a GGUF carries them).

The official templates are the `chat_template` of each Hugging Face `tokenizer_config.json`
(deepseek-ai/DeepSeek-V2-Lite-Chat, DeepSeek-V3, DeepSeek-R1, DeepSeek-R1-Distill-Qwen-7B),
vendored verbatim as test data.
"""

from typing import Any

import pytest

from aicc.engine.chat import ChatRenderer, builtin_template_name
from aicc.engine.types import ModelInfo
from aicc.errors import InvalidRequestError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"

OFFICIAL_V2 = (
    r"{% if not add_generation_prompt is defined %}"
    r"{% set add_generation_prompt = false %}{% endif %}"
    r"{{ bos_token }}{% for message in messages %}"
    r"{% if message['role'] == 'user' %}{{ 'User: ' + "
    r"message['content'] + '\n\n' }}"
    r"{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + "
    r"message['content'] + eos_token }}"
    r"{% elif message['role'] == 'system' %}{{ message['content'] + "
    r"'\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    r"{{ 'Assistant:' }}{% endif %}"
)

OFFICIAL_V3 = (
    r"{% if not add_generation_prompt is defined %}"
    r"{% set add_generation_prompt = false %}{% endif %}"
    r"{% set ns = namespace(is_first=false, is_tool=false, "
    r"is_output_first=true, system_prompt='', is_first_sp=true) %}"
    r"{%- for message in messages %}"
    r"{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    r"{% set ns.system_prompt = ns.system_prompt + "
    r"message['content'] %}{% set ns.is_first_sp = false %}"
    r"{%- else %}{% set ns.system_prompt = ns.system_prompt + "
    r"'\n\n' + message['content'] %}{%- endif %}{%- endif %}"
    r"{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    r"{%- for message in messages %}"
    r"{%- if message['role'] == 'user' %}"
    r"{%- set ns.is_tool = false -%}{{'<｜User｜>' + "
    r"message['content']}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is none %}"
    r"{%- set ns.is_tool = false -%}"
    r"{%- for tool in message['tool_calls']%}"
    r"{%- if not ns.is_first %}"
    r"{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + "
    r"tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + "
    r"'\n' + '```json' + '\n' + tool['function']['arguments'] + "
    r"'\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{%- set ns.is_first = true -%}{%- else %}{{'\n' + "
    r"'<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    r"tool['function']['name'] + '\n' + '```json' + '\n' + "
    r"tool['function']['arguments'] + '\n' + '```' + "
    r"'<｜tool▁call▁end｜>'}}"
    r"{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    r"{%- endfor %}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    r"{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + "
    r"message['content'] + '<｜end▁of▁sentence｜>'}}"
    r"{%- set ns.is_tool = false -%}{%- else %}{{'<｜Assistant｜>' + "
    r"message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}"
    r"{%- endif %}{%- if message['role'] == 'tool' %}"
    r"{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    r"{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + "
    r"message['content'] + '<｜tool▁output▁end｜>'}}"
    r"{%- set ns.is_output_first = false %}{%- else %}"
    r"{{'\n<｜tool▁output▁begin｜>' + message['content'] + "
    r"'<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}"
    r"{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    r"{% if add_generation_prompt and not ns.is_tool %}"
    r"{{'<｜Assistant｜>'}}{% endif %}"
)

OFFICIAL_R1 = (
    r"{% if not add_generation_prompt is defined %}"
    r"{% set add_generation_prompt = false %}{% endif %}"
    r"{% set ns = namespace(is_first=false, is_tool=false, "
    r"is_output_first=true, system_prompt='', is_first_sp=true) %}"
    r"{%- for message in messages %}"
    r"{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    r"{% set ns.system_prompt = ns.system_prompt + "
    r"message['content'] %}{% set ns.is_first_sp = false %}"
    r"{%- else %}{% set ns.system_prompt = ns.system_prompt + "
    r"'\n\n' + message['content'] %}{%- endif %}{%- endif %}"
    r"{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    r"{%- for message in messages %}"
    r"{%- if message['role'] == 'user' %}"
    r"{%- set ns.is_tool = false -%}{{'<｜User｜>' + "
    r"message['content']}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and 'tool_calls' in message %}"
    r"{%- set ns.is_tool = false -%}"
    r"{%- for tool in message['tool_calls'] %}"
    r"{%- if not ns.is_first %}{%- if message['content'] is none %}"
    r"{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + "
    r"tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + "
    r"'\n' + '```json' + '\n' + tool['function']['arguments'] + "
    r"'\n' + '```' + '<｜tool▁call▁end｜>'}}{%- else %}"
    r"{{'<｜Assistant｜>' + message['content'] + "
    r"'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + "
    r"'<｜tool▁sep｜>' + tool['function']['name'] + '\n' + "
    r"'```json' + '\n' + tool['function']['arguments'] + '\n' + "
    r"'```' + '<｜tool▁call▁end｜>'}}{%- endif %}"
    r"{%- set ns.is_first = true -%}{%- else %}{{'\n' + "
    r"'<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    r"tool['function']['name'] + '\n' + '```json' + '\n' + "
    r"tool['function']['arguments'] + '\n' + '```' + "
    r"'<｜tool▁call▁end｜>'}}{%- endif %}{%- endfor %}"
    r"{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}"
    r"{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + "
    r"message['content'] + '<｜end▁of▁sentence｜>'}}"
    r"{%- set ns.is_tool = false -%}{%- else %}"
    r"{% set content = message['content'] %}"
    r"{% if '</think>' in content %}"
    r"{% set content = content.split('</think>')[-1] %}{% endif %}"
    r"{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}"
    r"{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}"
    r"{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    r"{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + "
    r"message['content'] + '<｜tool▁output▁end｜>'}}"
    r"{%- set ns.is_output_first = false %}{%- else %}"
    r"{{'<｜tool▁output▁begin｜>' + message['content'] + "
    r"'<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}"
    r"{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    r"{% if add_generation_prompt and not ns.is_tool %}"
    r"{{'<｜Assistant｜><think>\n'}}{% endif %}"
)

OFFICIAL_R1_DISTILL_QWEN = (
    r"{% if not add_generation_prompt is defined %}"
    r"{% set add_generation_prompt = false %}{% endif %}"
    r"{% set ns = namespace(is_first=false, is_tool=false, "
    r"is_output_first=true, system_prompt='') %}"
    r"{%- for message in messages %}"
    r"{%- if message['role'] == 'system' %}"
    r"{% set ns.system_prompt = message['content'] %}{%- endif %}"
    r"{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    r"{%- for message in messages %}"
    r"{%- if message['role'] == 'user' %}"
    r"{%- set ns.is_tool = false -%}{{'<｜User｜>' + "
    r"message['content']}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is none %}"
    r"{%- set ns.is_tool = false -%}"
    r"{%- for tool in message['tool_calls']%}"
    r"{%- if not ns.is_first %}"
    r"{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + "
    r"tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + "
    r"'\n' + '```json' + '\n' + tool['function']['arguments'] + "
    r"'\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{%- set ns.is_first = true -%}{%- else %}{{'\n' + "
    r"'<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    r"tool['function']['name'] + '\n' + '```json' + '\n' + "
    r"tool['function']['arguments'] + '\n' + '```' + "
    r"'<｜tool▁call▁end｜>'}}"
    r"{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    r"{%- endfor %}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    r"{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + "
    r"message['content'] + '<｜end▁of▁sentence｜>'}}"
    r"{%- set ns.is_tool = false -%}{%- else %}"
    r"{% set content = message['content'] %}"
    r"{% if '</think>' in content %}"
    r"{% set content = content.split('</think>')[-1] %}{% endif %}"
    r"{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}"
    r"{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}"
    r"{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    r"{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + "
    r"message['content'] + '<｜tool▁output▁end｜>'}}"
    r"{%- set ns.is_output_first = false %}{%- else %}"
    r"{{'\n<｜tool▁output▁begin｜>' + message['content'] + "
    r"'<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}"
    r"{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    r"{% if add_generation_prompt and not ns.is_tool %}"
    r"{{'<｜Assistant｜><think>\n'}}{% endif %}"
)


def make_info(architecture: str, name: str, template: str | None = None) -> ModelInfo:
    return ModelInfo(
        name="m",
        path="/m.gguf",
        architecture=architecture,
        max_context=4096,
        vocab_size=1000,
        chat_template=template,
        bos_token=BOS,
        eos_token=EOS,
        general_name=name,
    )


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


CHAT: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "system", "content": "Answer in English."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello."},
    {"role": "user", "content": "Bye"},
]
TOOL_CHAT: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather and time in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            call("c1", "get_weather", '{"city": "Paris"}'),
            call("c2", "get_time", '{"tz": "CET"}'),
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "22C"},
    {"role": "tool", "tool_call_id": "c2", "content": "10:00"},
    {"role": "assistant", "content": "22C at 10:00."},
    {"role": "user", "content": "Thanks"},
]
CALLS = (
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
    '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜>\n'
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n"
    '```json\n{"tz": "CET"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
)


@pytest.mark.parametrize(
    ("architecture", "name", "expected"),
    [
        ("deepseek2", "DeepSeek V2 Lite Chat", "deepseek-v2"),
        ("deepseek2", "DeepSeek-V2-Chat-0628", "deepseek-v2"),
        ("deepseek2", "DeepSeek V2.5 1210", "deepseek-v3"),
        ("deepseek2", "DeepSeek V3 0324", "deepseek-v3"),
        ("deepseek2", "", "deepseek-v3"),
        ("deepseek2", "DeepSeek R1", "deepseek-r1"),
        ("deepseek2", "DeepSeek-R1-0528", "deepseek-r1"),
        ("qwen2", "DeepSeek R1 Distill Qwen 7B", "deepseek-r1"),
        ("llama", "DeepSeek-R1-Distill-Llama-8B", "deepseek-r1"),
        ("qwen2", "Qwen2.5 7B Instruct", "chatml"),
        ("llama", "Llama 3.1 8B Instruct", "llama3"),
    ],
)
def test_builtin_is_picked_by_architecture_and_name(
    architecture: str, name: str, expected: str
) -> None:
    info = make_info(architecture, name)
    assert builtin_template_name(info) == expected
    assert ChatRenderer(info).template_name == expected


def test_v2_reference_prompt() -> None:
    renderer = ChatRenderer(make_info("deepseek2", "DeepSeek V2 Lite Chat"))
    assert renderer.render(CHAT[:1] + CHAT[2:4] + CHAT[4:]) == (
        f"{BOS}Be brief.\n\nUser: Hi\n\nAssistant: <think>\nGreet back.\n</think>\n\nHello.{EOS}"
        "User: Bye\n\nAssistant:"
    )
    with pytest.raises(InvalidRequestError, match="not tool"):
        renderer.render(TOOL_CHAT[2:3])


def test_v3_reference_prompts() -> None:
    renderer = ChatRenderer(make_info("deepseek2", "DeepSeek V3"))
    assert renderer.render(CHAT) == (
        f"{BOS}Be brief.\n\nAnswer in English.<｜User｜>Hi"
        f"<｜Assistant｜><think>\nGreet back.\n</think>\n\nHello.{EOS}<｜User｜>Bye<｜Assistant｜>"
    )
    assert renderer.render(TOOL_CHAT) == (
        f"{BOS}<｜User｜>Weather and time in Paris?<｜Assistant｜>{CALLS}{EOS}"
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>22C<｜tool▁output▁end｜>\n"
        "<｜tool▁output▁begin｜>10:00<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
        f"22C at 10:00.{EOS}<｜User｜>Thanks<｜Assistant｜>"
    )
    # Right after tool results the model answers without a role tag.
    assert renderer.render(TOOL_CHAT[:3]).endswith("<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")
    assert not renderer.starts_in_reasoning
    assert renderer.tool_call_format == "deepseek"


def test_r1_strips_earlier_reasoning_and_opens_think() -> None:
    renderer = ChatRenderer(make_info("deepseek2", "DeepSeek R1"))
    assert renderer.render(CHAT) == (
        f"{BOS}Be brief.\n\nAnswer in English.<｜User｜>Hi"
        f"<｜Assistant｜>\n\nHello.{EOS}<｜User｜>Bye<｜Assistant｜><think>\n"
    )
    assert renderer.render(TOOL_CHAT) == (
        f"{BOS}<｜User｜>Weather and time in Paris?<｜Assistant｜>{CALLS}{EOS}"
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>22C<｜tool▁output▁end｜>"
        "<｜tool▁output▁begin｜>10:00<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
        f"22C at 10:00.{EOS}<｜User｜>Thanks<｜Assistant｜><think>\n"
    )
    assert renderer.starts_in_reasoning
    assert renderer.tool_call_format == "deepseek"


def test_tool_call_with_text_and_a_single_call_is_closed() -> None:
    # The original V3 template leaves a single call's block open (fixed in V3-0324 and R1).
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call("c", "f", "{}")]},
    ]
    for name in ("DeepSeek V3", "DeepSeek R1"):
        prompt = ChatRenderer(make_info("deepseek2", name)).render(messages)
        assert "<｜User｜>Paris?<｜Assistant｜>Checking.<｜tool▁calls▁begin｜>" in prompt
        assert prompt.endswith(
            f"<｜tool▁sep｜>f\n```json\n{{}}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>{EOS}"
            + ("<｜Assistant｜><think>\n" if name.endswith("R1") else "<｜Assistant｜>")
        )


@pytest.mark.parametrize(
    ("official", "architecture", "name", "conversations"),
    [
        (OFFICIAL_V2, "deepseek2", "DeepSeek V2 Lite Chat", [CHAT]),
        (OFFICIAL_V3, "deepseek2", "DeepSeek V3", [CHAT, TOOL_CHAT, TOOL_CHAT[:4]]),
        (OFFICIAL_R1, "deepseek2", "DeepSeek R1", [CHAT, TOOL_CHAT, TOOL_CHAT[:3]]),
        # The distill template keeps only the last system message: compare with one.
        (OFFICIAL_R1_DISTILL_QWEN, "qwen2", "DeepSeek R1 Distill Qwen 7B", [CHAT[1:]]),
    ],
    ids=["v2", "v3", "r1", "r1-distill-qwen"],
)
def test_official_template_in_gguf_renders_like_the_builtin(
    official: str, architecture: str, name: str, conversations: list[list[dict[str, Any]]]
) -> None:
    from_gguf = ChatRenderer(make_info(architecture, name, official))
    builtin = ChatRenderer(make_info(architecture, name))
    assert from_gguf.template_name == "gguf"
    for messages in conversations:
        for add_generation_prompt in (True, False):
            expected = from_gguf.render(messages, add_generation_prompt=add_generation_prompt)
            actual = builtin.render(messages, add_generation_prompt=add_generation_prompt)
            assert actual == expected
    assert from_gguf.starts_in_reasoning == builtin.starts_in_reasoning
    assert from_gguf.tool_call_format == builtin.tool_call_format


def test_official_templates_accept_messages_without_tool_call_keys() -> None:
    # OpenAI clients send `"tool_calls": null` and omit `content` on tool-call turns; the
    # official templates test `'tool_calls' in message` and `content is none`.
    renderer = ChatRenderer(make_info("deepseek2", "DeepSeek R1", OFFICIAL_R1))
    prompt = renderer.render([{"role": "user", "content": "Hi", "tool_calls": None}])
    assert prompt == f"{BOS}<｜User｜>Hi<｜Assistant｜><think>\n"
    v3 = ChatRenderer(make_info("deepseek2", "DeepSeek V3", OFFICIAL_V3))
    turn = {"role": "assistant", "tool_calls": [call("c", "f", "{}")]}
    assert "<｜Assistant｜><｜tool▁calls▁begin｜>" in v3.render(
        [{"role": "user", "content": "x"}, turn]
    )


def test_builtin_deepseek_templates_describe_tools_in_the_system_prompt() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a <city>",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    for name in ("DeepSeek V3", "DeepSeek R1"):
        renderer = ChatRenderer(make_info("deepseek2", name))
        assert renderer.supports_tools
        prompt = renderer.render(CHAT[:1] + CHAT[2:3], tools=tools)
        # Plain JSON, as Hugging Face's tojson writes it (no HTML escaping of "<").
        assert prompt.startswith(
            f"{BOS}Be brief.\n\n## Tools\nYou can call these functions (JSON schemas):\n"
            '{"name": "get_weather", "description": "Weather for a <city>", "parameters": '
            '{"type": "object", "properties": {"city": {"type": "string"}}}}\n'
        )
        assert prompt.endswith("<｜tool▁calls▁end｜><｜User｜>Hi" + renderer.render([])[len(BOS) :])
        assert renderer.render(CHAT, tools=[]) == renderer.render(CHAT)
    # The official templates ignore tools altogether.
    assert not ChatRenderer(make_info("deepseek2", "DeepSeek V3", OFFICIAL_V3)).supports_tools


def test_builtin_deepseek_rejects_unknown_roles() -> None:
    renderer = ChatRenderer(make_info("deepseek2", "DeepSeek V3"))
    with pytest.raises(InvalidRequestError, match="not function"):
        renderer.render([{"role": "function", "content": "x"}])
