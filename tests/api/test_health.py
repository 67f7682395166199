"""Readiness without a loaded engine (no lifespan has run): 503, never a crash."""

from __future__ import annotations

import asyncio

import httpx

from aicc.api.app import create_app
from aicc.config import load_settings
from tests.conftest import ADMIN_KEY


def test_readyz_is_503_until_the_engine_is_up() -> None:
    app = create_app(load_settings())

    async def probe() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://aicc") as client:
            return (
                await client.get("/readyz"),
                await client.get("/healthz"),
                await client.post(
                    "/v1/completions",
                    json={"model": "m", "prompt": "x"},
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                ),
            )

    ready, health, completion = asyncio.run(probe())
    assert ready.status_code == 503
    assert ready.json()["status"] == "starting"
    assert health.status_code == 200
    # With no engine, the API answers with a clean error, not a traceback.
    assert completion.status_code == 503
    assert completion.json()["error"]["code"] == "engine_unavailable"
