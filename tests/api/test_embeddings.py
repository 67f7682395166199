"""`/v1/embeddings` through the official `openai` SDK against a live aicc on the bundled model."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import httpx
import numpy as np
import numpy.typing as npt
import openai
import pytest

from aicc.engine.llamacpp.embedder import plan_groups
from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import LiveServer

MODEL = BUNDLED_MODEL_NAME
Vector = npt.NDArray[np.float64]


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0
    ) as c:
        yield c


def embed(client: openai.OpenAI, text: str | list[str], **kwargs: object) -> list[Vector]:
    response = client.embeddings.create(model=MODEL, input=text, **kwargs)  # type: ignore[arg-type]
    return [np.array(item.embedding) for item in response.data]


def test_shape_unit_length_and_usage(client: openai.OpenAI, server: LiveServer) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    response = client.embeddings.create(
        model=MODEL, input=text, encoding_format="float", user="tester"
    )
    assert response.object == "list"
    assert response.model == MODEL
    (item,) = response.data
    assert item.object == "embedding"
    assert item.index == 0
    assert len(item.embedding) == server.engine.embedding_size == 640
    assert np.linalg.norm(item.embedding) == pytest.approx(1.0, abs=1e-5)
    num_tokens = len(server.engine.tokenize(text, add_special=True))
    assert response.usage.prompt_tokens == response.usage.total_tokens == num_tokens


def test_float_and_base64_give_the_same_vectors(client: openai.OpenAI, server: LiveServer) -> None:
    texts = ["a red apple", "a green pear"]
    as_floats = embed(client, texts, encoding_format="float")
    as_sdk_default = embed(client, texts)  # the SDK asks for base64 and decodes it
    body = {"model": MODEL, "input": texts, "encoding_format": "base64"}
    raw = httpx.post(
        server.base_url + "/v1/embeddings", json=body, timeout=60, headers=server.headers
    ).json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in raw["data"]]
    for floats, sdk, raw_vector in zip(as_floats, as_sdk_default, decoded, strict=True):
        assert np.array_equal(floats, sdk)
        assert np.array_equal(floats, raw_vector.astype(np.float64))


def test_similarity(client: openai.OpenAI) -> None:
    same_a, same_b, cat, code = embed(
        client,
        [
            "The cat sleeps on the warm windowsill.",
            "The cat sleeps on the warm windowsill.",
            "A kitten naps in the sun by the window.",
            "def main(): return sys.exit(1)",
        ],
    )
    assert float(same_a @ same_b) == pytest.approx(1.0, abs=1e-5)
    assert float(same_a @ cat) < 0.999
    assert float(same_a @ cat) > float(same_a @ code)


BATCH_TEXTS = [
    f"Sentence number {i} is about {['cats', 'ships', 'rain'][i % 3]}." for i in range(69)
]
BATCH_TEXTS.append(" ".join(f"word{i}" for i in range(150)))  # spans several decode calls


def test_batch_equals_one_by_one(client: openai.OpenAI) -> None:
    # More inputs than one group holds. CPU kernels round a row differently with the shape of
    # the call it is in, so a batched vector is close to, not equal to, the one made alone.
    batched = embed(client, BATCH_TEXTS)
    assert len(batched) == len(BATCH_TEXTS)
    for index in (0, 1, 2, 62, 63, 64, 68, 69):
        (alone,) = embed(client, BATCH_TEXTS[index])
        assert float(batched[index] @ alone) > 0.999
        np.testing.assert_allclose(batched[index], alone, atol=2e-2)


def test_batch_invariant_mode_is_exact(deterministic_server: LiveServer) -> None:
    with openai.OpenAI(
        base_url=deterministic_server.base_url + "/v1",
        api_key=deterministic_server.api_key,
        max_retries=0,
    ) as client:
        batched = embed(client, BATCH_TEXTS)
        for index in (0, 1, 30, 62, 63, 64, 68, 69):
            (alone,) = embed(client, BATCH_TEXTS[index])
            np.testing.assert_array_equal(batched[index], alone)


def test_dimensions_truncate_and_renormalise(client: openai.OpenAI) -> None:
    text = "Matryoshka embeddings nest like dolls."
    (full,) = embed(client, text)
    (short,) = embed(client, text, dimensions=64)
    assert len(short) == 64
    np.testing.assert_allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-5)
    (same,) = embed(client, text, dimensions=640)
    np.testing.assert_allclose(same, full, atol=1e-6)


def test_token_id_inputs(client: openai.OpenAI, server: LiveServer) -> None:
    texts = ["token ids in", "and two of them"]
    # Same layout as the text requests, so the same vectors bit for bit.
    by_text = embed(client, texts)
    token_ids = [server.engine.tokenize(text, add_special=True) for text in texts]
    response = client.embeddings.create(model=MODEL, input=token_ids[0])
    assert response.usage.prompt_tokens == len(token_ids[0])
    np.testing.assert_allclose(response.data[0].embedding, embed(client, texts[0])[0], atol=1e-6)
    both = client.embeddings.create(model=MODEL, input=token_ids)
    for item, expected in zip(both.data, by_text, strict=True):
        np.testing.assert_allclose(item.embedding, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("value", "param", "words"),
    [
        ("", "input", "empty"),
        ([], "input", "empty"),
        (["ok", ""], "input", "input[1]"),
        ([[1, 2], []], "input", "input[1]"),
        ([1, 300000], "input", "[0, 262144)"),
        ([5] * 2049, "input", "2049 tokens"),
        (["x"] * 2049, "input", "2048"),
        ([1, "a"], "input", "list of token ids"),
        ({"text": "x"}, "input", "a string"),
    ],
)
def test_bad_input_is_400(
    client: openai.OpenAI, server: LiveServer, value: object, param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/embeddings", body={"model": MODEL, "input": value}, cast_to=object)
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith(param)
    assert words in error["message"]
    assert httpx.get(server.base_url + "/readyz").status_code == 200
    assert len(embed(client, "still fine")[0]) == 640


def test_bad_options(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, input="x", dimensions=641)
    assert caught.value.body["param"] == "dimensions"  # type: ignore[index]
    assert "640" in caught.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="x", encoding_format="int8")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError) as not_found:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert not_found.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_async_client_concurrent_requests(client: openai.OpenAI, server: LiveServer) -> None:
    texts = [f"concurrent request {i}" for i in range(6)]
    expected = [embed(client, text)[0] for text in texts]

    async def run() -> list[list[float]]:
        async with openai.AsyncOpenAI(
            base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0
        ) as aclient:
            responses = await asyncio.gather(
                *(aclient.embeddings.create(model=MODEL, input=text) for text in texts)
            )
        return [response.data[0].embedding for response in responses]

    for got, want in zip(asyncio.run(run()), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_embedding_during_a_chat_stream(client: openai.OpenAI, server: LiveServer) -> None:
    messages = [{"role": "user", "content": "Tell me a story about a lighthouse."}]
    options = {"max_tokens": 40, "temperature": 0, "extra_body": {"ignore_eos": True}}
    # Another tenant's key: the stream below must not reuse the reference's cached prompt
    # (a cache hit computes the last prompt token in a batch of another shape).
    other_key = server.create_user_key("embedding-reference-tenant")
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=other_key, max_retries=0) as other:
        reference = other.chat.completions.create(model=MODEL, messages=messages, **options)  # type: ignore[call-overload]

    async def run() -> tuple[str, str | None, int]:
        async with openai.AsyncOpenAI(
            base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0
        ) as aclient:
            stream = await aclient.chat.completions.create(
                model=MODEL, messages=messages, stream=True, **options
            )
            parts: list[str] = []
            finish = None
            num_embedded = 0
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
                if len(parts) in (2, 10):  # embed while the stream is running
                    texts = [f"side request {i} " * 20 for i in range(8)]
                    response = await aclient.embeddings.create(model=MODEL, input=texts)
                    num_embedded += len(response.data)
            return "".join(parts), finish, num_embedded

    text, finish, num_embedded = asyncio.run(run())
    assert num_embedded == 16
    assert finish == "length"
    assert text == reference.choices[0].message.content
    server.wait_until_idle()


def test_plan_groups() -> None:
    # Sizes count padding to whole groups of four rows; a too-long input is a group of its own.
    assert plan_groups([3, 3, 3], max_num_seqs=2, max_num_tokens=16) == [[0, 1], [2]]
    assert plan_groups([6, 5, 4, 1], max_num_seqs=8, max_num_tokens=12) == [[0], [1, 2], [3]]
    assert plan_groups([2, 30, 2], max_num_seqs=8, max_num_tokens=16) == [[0], [1], [2]]
    assert plan_groups([], max_num_seqs=1, max_num_tokens=16) == []
