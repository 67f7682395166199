"""Prefix caching through the API: reuse within a tenant, none across tenants."""

from __future__ import annotations

import httpx
import openai

from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import LiveServer

SYSTEM = "You are a careful assistant for a library. Cite the shelf of every book. " * 12


def ask(server: LiveServer, api_key: str, question: str) -> int:
    """Send a chat request; return how many prompt tokens it took from the cache."""
    before = server.engine.stats().num_prefix_hit_tokens
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=api_key, max_retries=0) as c:
        c.chat.completions.create(
            model=BUNDLED_MODEL_NAME,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            max_tokens=2,
            temperature=0,
        )
    server.wait_until_idle()
    return server.engine.stats().num_prefix_hit_tokens - before


def test_same_tenant_reuses_other_tenant_does_not(caching_server: LiveServer) -> None:
    system_tokens = len(caching_server.engine.tokenize(SYSTEM, add_special=False))
    key_a = caching_server.create_user_key("tenant-a")
    key_a2 = caching_server.create_user_key("tenant-a")
    key_b = caching_server.create_user_key("tenant-b")
    assert ask(caching_server, key_a, "Where is Dune?") == 0, "cold"
    assert ask(caching_server, key_a, "Where is Emma?") >= system_tokens, "warm, same key"
    assert ask(caching_server, key_a2, "Where is Kim?") >= system_tokens, "same user, other key"
    assert ask(caching_server, key_b, "Where is Ulysses?") == 0, "another tenant: cold"
    assert ask(caching_server, key_b, "Where is Walden?") >= system_tokens
    assert caching_server.engine.stats().num_cached_prefixes >= 2


def test_the_x_api_key_header_names_the_tenant_too(caching_server: LiveServer) -> None:
    key_c = caching_server.create_user_key("tenant-c")
    key_d = caching_server.create_user_key("tenant-d")
    body = {
        "model": BUNDLED_MODEL_NAME,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}],
        "max_tokens": 1,
    }
    ask(caching_server, key_c, "Where is Hamlet?")
    before = caching_server.engine.stats().num_prefix_hit_tokens
    url = caching_server.base_url + "/v1/chat/completions"
    assert httpx.post(url, json=body, headers={"x-api-key": key_d}).status_code == 200
    assert caching_server.engine.stats().num_prefix_hit_tokens == before, "key-d is cold"
    assert httpx.post(url, json=body, headers={"x-api-key": key_c}).status_code == 200
    assert caching_server.engine.stats().num_prefix_hit_tokens > before, "key-c is warm"
