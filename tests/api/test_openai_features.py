"""OpenAI API features through the official SDK (sync and async): n, logprobs, response
formats, tools, and the bad inputs each one must refuse with a 400."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from aicc.api.openai.protocol import ChatCompletionRequest
from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import LiveServer

MODEL = BUNDLED_MODEL_NAME
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0
    ) as c:
        yield c


# -- n ---------------------------------------------------------------------------------------
def test_n_choices_chat_and_completion(client: openai.OpenAI, server: LiveServer) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=QUESTION, n=4, max_tokens=12, temperature=1.0, seed=7
    )
    assert sorted(choice.index for choice in response.choices) == [0, 1, 2, 3]
    assert len({choice.message.content for choice in response.choices}) > 1, "choices differ"
    assert response.usage is not None
    assert 4 <= response.usage.completion_tokens <= 4 * 12
    completion = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        n=3,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert len({c.text for c in completion.choices}) == 1, "greedy choices are identical"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3 * 8


def test_n_choices_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        n=3,
        max_tokens=10,
        temperature=1.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = ["", "", ""]
    finishes: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert sorted(finishes) == [0, 1, 2]
    assert all(texts)
    assert usage is not None
    assert usage.completion_tokens >= 3


def http_chunks(raw: bytes) -> list[bytes]:
    """The pieces of a chunked HTTP body as sent (one per write of the server)."""
    body = raw.split(b"\r\n\r\n", 1)[1]
    pieces = []
    while True:
        size_line, body = body.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return pieces
        pieces.append(body[:size])
        body = body[size + 2 :]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_streams_last_chunk_and_its_usage_leave_in_one_write(
    server: LiveServer, path: str
) -> None:
    # A gateway relaying the stream then reads them as one: it starts its audit commit
    # before the client gets the last chunk, and wakes once instead of twice.
    prompt: dict[str, Any] = (
        {"messages": QUESTION} if path == "/v1/chat/completions" else {"prompt": "Say hi."}
    )
    options = {"max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    body = json.dumps({"model": MODEL, **prompt, **options}).encode()
    host, port = server.base_url.removeprefix("http://").split(":")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {server.api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head + body)
        raw = b""
        while data := sock.recv(65536):
            raw += data
    pieces = http_chunks(raw)
    finishing = [p for p in pieces if b'"finish_reason":"' in p]
    assert len(finishing) == 1
    events = [e for e in finishing[0].split(b"\n\n") if e]
    assert len(events) == 2, events  # the last choice's chunk, then the usage-only chunk
    usage = json.loads(events[1].removeprefix(b"data: "))
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] >= 1
    assert pieces[-1] == b"data: [DONE]\n\n"


def test_n_shares_the_prompt_kv(server: LiveServer, client: openai.OpenAI) -> None:
    """The n choices compute the prompt once: the other choices' prompt tokens are hits."""
    before = server.engine.stats().num_prefix_hit_tokens
    prompt = "A long, unrepeated prompt about lighthouses " * 10 + "n-share-check"
    response = client.completions.create(
        model=MODEL, prompt=prompt, n=4, max_tokens=4, temperature=1.0
    )
    assert response.usage is not None
    prompt_tokens = response.usage.prompt_tokens
    assert server.engine.stats().num_prefix_hit_tokens - before >= 3 * prompt_tokens


# -- logprobs --------------------------------------------------------------------------------
def test_chat_logprobs_shape(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"ignore_eos": True},
    )
    logprobs = response.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert len(logprobs.content) == 6
    for entry in logprobs.content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 5
        tops = [top.logprob for top in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # Greedy: the sampled token is the most likely one.
        assert entry.logprob == pytest.approx(tops[0], abs=1e-4)
        assert bytes(entry.bytes or []).decode("utf-8", "replace") == entry.token


def test_completion_logprobs_stream_and_legacy_shape(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=MODEL,
        prompt="The sky is",
        max_tokens=5,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    logprobs = response.choices[0].logprobs
    assert logprobs is not None
    assert len(logprobs.tokens or []) == len(logprobs.token_logprobs or []) == 5
    assert all(len(top) == 3 for top in logprobs.top_logprobs or [])
    assert "".join(logprobs.tokens or []) == response.choices[0].text
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    entries = [
        e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content or []
    ]
    assert len(entries) == 5
    assert all(entry.top_logprobs == [] for entry in entries)


# -- response_format -------------------------------------------------------------------------
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer"},
        "pets": {
            "type": "array",
            "items": {"type": "string", "enum": ["cat", "dog"]},
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    for temperature in (0.0, 1.0):
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Describe a person as JSON."}],
            max_tokens=120,
            temperature=temperature,
            seed=3,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
            },
        )
        choice = response.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), PERSON_SCHEMA)


def test_json_object_output_parses_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "List two colors as a JSON object."}],
        max_tokens=150,
        temperature=0,
        response_format={"type": "json_object"},
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


def test_grammar_sampling_with_a_reordering_chain_matches_greedy(client: openai.OpenAI) -> None:
    """top_k sorts the candidate array in place; every token must still map to its own logit
    (top_k=1 at temperature 1 is greedy decoding by another route)."""

    def answer(**sampling: Any) -> str:
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "List two colors as a JSON object."}],
            max_tokens=40,
            response_format={"type": "json_object"},
            **sampling,
        )
        return response.choices[0].message.content or ""

    assert answer(temperature=1.0, seed=5, extra_body={"top_k": 1}) == answer(temperature=0)


# -- tools -----------------------------------------------------------------------------------
def test_required_tool_call(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.id.startswith("call_")
    tool = WEATHER_TOOL if call.function.name == "get_weather" else TIME_TOOL
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_named_tool_call_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Time please."}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=80,
        temperature=0,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                if delta.function is not None:
                    entry["name"] += delta.function.name or ""
                    entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert calls
    assert all(call["name"] == "get_time" for call in calls.values())
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), TIME_TOOL["function"]["parameters"])


def test_auto_tool_choice_describes_the_tools_and_answers_well_formed(
    client: openai.OpenAI, server: LiveServer
) -> None:
    """The bundled template has no tool support: the signatures go into the system message."""
    messages: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    plain = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0
    )
    auto = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        max_tokens=16,
        temperature=0,
    )
    assert plain.usage is not None
    assert auto.usage is not None
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 50
    prompt = server.app.state.chat._messages(
        ChatCompletionRequest.model_validate(
            {"model": MODEL, "messages": messages, "tools": [WEATHER_TOOL]}
        ),
        [WEATHER_TOOL],
    )[0]["content"]
    assert "get_weather" in prompt
    assert "<tool_call>" in prompt
    choice = auto.choices[0]
    if choice.message.tool_calls:  # the base model rarely calls; a call must be well formed
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            json.loads(call.function.arguments)
    else:
        assert choice.finish_reason in ("stop", "length")


def test_tool_results_in_history_and_tool_choice_none(client: openai.OpenAI) -> None:
    messages: Any = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Oslo", "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 3}'},
    ]
    response = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_tokens=10,
        temperature=0,
    )
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].finish_reason in ("stop", "length")


def test_async_client_parallel_features(server: LiveServer) -> None:
    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(
            base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0
        ) as client:
            return await asyncio.gather(
                client.chat.completions.create(
                    model=MODEL, messages=QUESTION, n=2, max_tokens=8, logprobs=True, top_logprobs=2
                ),
                client.chat.completions.create(
                    model=MODEL,
                    messages=QUESTION,
                    max_tokens=60,
                    temperature=0,
                    response_format={
                        "type": "json_schema",
                        "json_schema": {"name": "p", "schema": PERSON_SCHEMA},
                    },
                ),
            )

    first, second = asyncio.run(run())
    assert len(first.choices) == 2
    assert all(c.logprobs and c.logprobs.content for c in first.choices)
    if second.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(second.choices[0].message.content), PERSON_SCHEMA)


# -- bad input -------------------------------------------------------------------------------
def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("n too large", {"n": 9}, "n"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, "top_logprobs"),
    ("too many stop strings", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    (
        "deeply nested schema",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": nested(200)},
            }
        },
        "response_format",
    ),
    (
        "pathological pattern",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {
                        "type": "object",
                        "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}},
                        "required": ["s"],
                    },
                },
            }
        },
        "response_format",
    ),
    (
        "tool parameters that are not JSON Schema",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 12}}}]},
        "tools[0].function.parameters",
    ),
    ("unknown message role", {"messages": [{"role": "wizard", "content": "hi"}]}, ""),
    (
        "unsupported content part",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
        "",
    ),
    ("tool_choice without tools", {"tool_choice": "required"}, "tool_choice"),
]


@pytest.mark.parametrize(("case", "fields", "param"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_inputs_are_400_and_streams_keep_flowing(
    server: LiveServer, case: str, fields: dict[str, Any], param: str
) -> None:
    async def run() -> tuple[Any, str]:
        async with openai.AsyncOpenAI(
            base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0
        ) as client:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=QUESTION,
                max_tokens=24,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            body = {"model": MODEL, "messages": QUESTION, **fields}
            try:
                await client.post("/chat/completions", body=body, cast_to=object)
            except openai.BadRequestError as exc:
                error: Any = exc.body
            else:
                error = None
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return error, text

    error, text = asyncio.run(run())
    assert error is not None, f"{case}: not refused"
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    if param:
        assert str(error["param"]).startswith(param)
    assert text, "the concurrent stream kept flowing"
    assert server.engine.health().is_ready
