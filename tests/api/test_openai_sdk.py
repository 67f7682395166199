"""The official `openai` SDK against a live aicc on the bundled model."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import LiveServer

MODEL = BUNDLED_MODEL_NAME
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0
    ) as c:
        yield c


def test_chat_completion(client: openai.OpenAI, server: LiveServer) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,  # type: ignore[arg-type]
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert response.model == MODEL
    assert response.object == "chat.completion"
    assert response.system_fingerprint
    usage = response.usage
    assert usage is not None
    prompt = server.app.state.chat.renderer.render(QUESTION)
    assert usage.prompt_tokens == len(server.engine.tokenize(prompt, add_special=False))
    assert 1 <= usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=20,
        temperature=0,  # type: ignore[arg-type]
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_and_usage_counts(client: openai.OpenAI, server: LiveServer) -> None:
    prompt = "The capital of France is"
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert response.object == "text_completion"
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(server.engine.tokenize(prompt, add_special=True))
    if response.choices[0].finish_reason == "length":
        assert response.usage.completion_tokens == 8
    stream = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text == response.choices[0].text


def test_token_id_prompt(client: openai.OpenAI, server: LiveServer) -> None:
    token_ids = server.engine.tokenize("Once upon a time", add_special=True)
    by_ids = client.completions.create(model=MODEL, prompt=token_ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=MODEL,
        prompt="Count: 1, 2, 3,",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None
    assert response.usage.completion_tokens == 5


def test_stop_string_ends_output_and_is_not_leaked(client: openai.OpenAI) -> None:
    prompt = "Count: 1, 2, 3,"
    free = (
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    assert len(free) > 6
    stop = free[3:6]
    expected = free[: free.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop], stream=True
            )
            pieces = [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks if c.choices]
            text = "".join(p for p, _ in pieces)
            finish = pieces[-1][1]
        else:
            response = client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop
            )
            text, finish = response.choices[0].text, response.choices[0].finish_reason
        assert text == expected
        assert stop not in text
        assert finish == "stop"


def test_seed_determinism(deterministic_server: LiveServer) -> None:
    """Seeded sampling repeats exactly in deterministic mode. (In the default mode a repeat is
    served from the prefix cache: only the last prompt token is recomputed, in a batch of a
    different shape, which can move low-order bits of the logits and so a sampled token.)"""
    client = openai.OpenAI(
        base_url=deterministic_server.base_url + "/v1",
        api_key=deterministic_server.api_key,
        max_retries=0,
    )

    def sample(seed: int) -> str:
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a short poem about the sea."}],
            max_tokens=24,
            temperature=1.0,
            top_p=0.95,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return response.choices[0].message.content or ""

    with client:
        first = sample(1234)
        assert first == sample(1234)
        assert len({first, sample(1), sample(2), sample(3)}) > 1


def test_sampling_parameters_are_accepted(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        max_completion_tokens=8,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=7,
        user="tester",
        logit_bias={"1": -100},
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    assert response.usage is not None
    assert response.usage.completion_tokens <= 8


def test_logit_bias_bans_the_greedy_token(client: openai.OpenAI, server: LiveServer) -> None:
    prompt = "The capital of France is"
    free = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    first = free.choices[0].text
    (token_id,) = server.engine.tokenize(first, add_special=False)
    for temperature in (0.0, 0.5):  # the greedy fast path and the sampler chain
        banned = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=1,
            temperature=temperature,
            seed=3,
            logit_bias={str(token_id): -100},
        )
        assert banned.choices[0].text != first


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "aicc"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=QUESTION)  # type: ignore[arg-type]
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "model_not_found"
    assert body["param"] == "model"
    assert body["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 3.5),
        ("top_p", 0.0),
        ("max_tokens", 0),
        ("presence_penalty", 9),
        ("n", 9),
        ("top_logprobs", 21),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("logit_bias", {"not-a-token": 1}),
        ("logit_bias", {"999999999": 1}),
        ("logit_bias", {"5": -101}),
        ("messages", []),
    ],
)
def test_bad_parameters_are_400(client: openai.OpenAI, field: str, value: object) -> None:
    body = {"model": MODEL, "messages": QUESTION, field: value}
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/chat/completions", body=body, cast_to=object)
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["type"] == "invalid_request_error"
    assert field in (error["param"] or "")
    assert error["message"]
