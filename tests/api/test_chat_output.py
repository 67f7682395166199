import json
import random
from typing import Any

import pytest

from aicc.api.openai.chat_output import (
    ChatDelta,
    ChatOutputProcessor,
    delta_json,
    message_json,
)
from aicc.engine.toolcalls import ToolCall, ToolCallParser

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def make_processor(*, reasoning: bool = True, tools: bool = True) -> ChatOutputProcessor:
    parser = ToolCallParser("hermes", {"get_weather"}) if tools else None
    return ChatOutputProcessor(reasoning, starts_in_reasoning=True, tool_parser=parser)


def run(pieces: list[str], **kwargs: Any) -> tuple[list[ChatDelta], bool]:
    processor = make_processor(**kwargs)
    deltas = [processor.push(piece) for piece in pieces] + [processor.finish()]
    return deltas, processor.has_tool_calls


def comparable(message: dict[str, Any]) -> dict[str, Any]:
    """The message without the random call ids."""
    for call in message.get("tool_calls", []):
        assert call.pop("id").startswith("call_")
    return message


def random_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), k=rng.randint(1, 10)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


OUTPUTS = [
    "Think about <tool_call> in reasoning.\n</think>\n\nIt is sunny. 🌞",
    "Need the weather.\n</think>\n\nLet me check.\n" + CALL,
    "Weather.\n</think>\n\n" + CALL + "\n" + CALL,
    "Cut off while thinking " + CALL,
    "Short.</think>" + CALL.replace("get_weather", "unknown"),
]


@pytest.mark.parametrize("output", OUTPUTS)
def test_streamed_deltas_add_up_to_the_one_piece_message(output: str) -> None:
    whole, has_calls = run([output])
    expected = comparable(message_json(whole))
    rng = random.Random(7)
    for pieces in [list(output), *(random_pieces(output, rng) for _ in range(40))]:
        deltas, streamed_has_calls = run(pieces)
        assert comparable(message_json(deltas)) == expected, pieces
        assert streamed_has_calls == has_calls


def test_reasoning_and_content_message() -> None:
    deltas, has_calls = run([OUTPUTS[0]])
    assert message_json(deltas) == {
        "role": "assistant",
        "content": "It is sunny. 🌞",
        "reasoning_content": "Think about <tool_call> in reasoning.",
    }
    assert not has_calls


def test_tool_calls_only_message_has_null_content() -> None:
    deltas, has_calls = run(["Weather.\n</think>\n\n" + CALL + "\n" + CALL])
    message = message_json(deltas)
    assert has_calls
    assert message["content"] is None
    assert message["reasoning_content"] == "Weather."
    calls = message["tool_calls"]
    assert [c["function"] for c in calls] == [
        {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    ] * 2
    assert all(c["type"] == "function" and "index" not in c for c in calls)
    assert calls[0]["id"] != calls[1]["id"]


def test_content_and_calls_together() -> None:
    message = message_json(run(["Need the weather.\n</think>\n\nLet me check.\n" + CALL])[0])
    assert message["content"] == "Let me check."
    assert len(message["tool_calls"]) == 1


def test_unknown_function_stays_content() -> None:
    deltas, has_calls = run([OUTPUTS[4]])
    assert not has_calls
    assert message_json(deltas)["content"] == CALL.replace("get_weather", "unknown")


def test_without_reasoning_or_tools_text_passes_through() -> None:
    text = "<think>kept</think> " + CALL
    deltas, has_calls = run([text], reasoning=False, tools=False)
    assert message_json(deltas) == {"role": "assistant", "content": text}
    assert not has_calls


def test_empty_output_gives_empty_content() -> None:
    assert message_json(run([])[0]) == {"role": "assistant", "content": ""}


def test_delta_json_leaves_out_empty_fields() -> None:
    assert delta_json(ChatDelta()) == {}
    assert delta_json(ChatDelta(content="hi")) == {"content": "hi"}
    assert delta_json(ChatDelta(reasoning_content="hm")) == {"reasoning_content": "hm"}
    call = ToolCall(index=1, id="call_" + "0" * 24, name="f", arguments="{}")
    assert delta_json(ChatDelta(tool_calls=(call,))) == {
        "tool_calls": [
            {
                "index": 1,
                "id": "call_" + "0" * 24,
                "type": "function",
                "function": {"name": "f", "arguments": "{}"},
            }
        ]
    }
    json.dumps(delta_json(ChatDelta("a", "b", (call,))))


def test_streamed_call_delta_carries_its_index() -> None:
    processor = make_processor()
    assert delta_json(processor.push("ok</think>")) == {"reasoning_content": "ok"}
    first = delta_json(processor.push(CALL))
    assert first["tool_calls"][0]["index"] == 0
    second = delta_json(processor.push(CALL))
    assert second["tool_calls"][0]["index"] == 1
    assert processor.has_tool_calls
    assert delta_json(processor.finish()) == {}
