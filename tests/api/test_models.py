"""`GET /v1/models` and `GET /v1/models/{id}` through the official `openai` SDK."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import LiveServer


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0
    ) as c:
        yield c


def test_retrieve_matches_the_list_entry(client: openai.OpenAI, server: LiveServer) -> None:
    (listed,) = client.models.list().data
    model = client.models.retrieve(BUNDLED_MODEL_NAME)
    assert model == listed
    assert model.id == BUNDLED_MODEL_NAME
    assert model.object == "model"
    assert model.owned_by == "aicc"
    assert model.model_extra == {"max_model_len": server.engine.model_info.max_context}


@pytest.mark.parametrize("model_id", ["gpt-4o", "org/other-model", BUNDLED_MODEL_NAME + "x"])
def test_unknown_model_is_404(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve(model_id)
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "model_not_found"
    assert body["type"] == "invalid_request_error"
    assert model_id in body["message"]


def test_async_client(server: LiveServer) -> None:
    async def run() -> tuple[str, int]:
        async with openai.AsyncOpenAI(
            base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0
        ) as client:
            model = await client.models.retrieve(BUNDLED_MODEL_NAME)
            try:
                await client.models.retrieve("missing")
            except openai.NotFoundError as error:
                return model.id, error.status_code
        raise AssertionError("no 404 for an unknown model")

    assert asyncio.run(run()) == (BUNDLED_MODEL_NAME, 404)
