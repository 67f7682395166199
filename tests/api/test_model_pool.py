"""Registered models served beside the configured one: loaded on demand, evicted, followed in
the registry while the server runs, encrypted ones decrypted into memory only."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import httpx
import openai
import pytest

from aicc.api.app import create_app
from aicc.api.models import ModelPool
from aicc.config import load_settings
from aicc.db import Database
from aicc.store.crypto import ENCRYPTED_SUFFIX, ModelDecryptionError
from aicc.store.importer import import_model
from aicc.store.local import BUNDLED_MODEL_NAME
from aicc.store.ops import encrypt_model, quantize_model
from aicc.store.registry import ModelRegistry
from tests.conftest import ADMIN_KEY, LiveServer, start_server
from tests.models.tiny_deepseek import write_tiny_deepseek

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
QUANTIZED = "gemma3:q4_0"
ENCRYPTED = "gemma3:enc"
OTHER_KEY_MODEL = "gemma3:other-key"
BUNDLED_FILE = f"{BUNDLED_MODEL_NAME}.gguf"
PROMPT = "The three primary colours are"
SERVER_SETTINGS: dict[str, Any] = {
    "threads": 1,
    "max_batch_size": 2,
    "ctx_size": 1024,
    "prefix_cache": False,  # greedy outputs are compared across engines
    "model_poll_s": 0.2,
    "max_loaded_models": 2,
}


@dataclass(frozen=True, slots=True)
class Store:
    model_dir: Path
    state_dir: Path
    key_file: Path
    registry: ModelRegistry


def write_key(path: Path, key: bytes) -> Path:
    path.write_text(key.hex())
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def store(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """A model directory holding the bundled model, a Q4_0 quantization of it, an encrypted
    copy, and a copy encrypted under another key; registered in the servers' state database."""
    root = tmp_path_factory.mktemp("pool")
    models = root / "models"
    models.mkdir()
    os.link(model_dir / BUNDLED_FILE, models / BUNDLED_FILE)  # no copy
    state = root / "state"
    database = Database(f"sqlite:///{state / 'aicc.db'}")
    database.migrate()
    registry = ModelRegistry(database, models)
    quantize_model(registry, models, BUNDLED_MODEL_NAME, "Q4_0", QUANTIZED, None)
    import_model(registry, models / BUNDLED_FILE, ENCRYPTED)
    encrypt_model(registry, models, ENCRYPTED, KEY)
    import_model(registry, models / BUNDLED_FILE, OTHER_KEY_MODEL, encrypt_key=OTHER_KEY)
    yield Store(models, state, write_key(root / "model.key", KEY), registry)
    database.close()


@pytest.fixture(scope="module")
def live(store: Store) -> Iterator[LiveServer]:
    server = start_server(
        store.model_dir, state_dir=store.state_dir, model_key_file=store.key_file,
        **SERVER_SETTINGS,
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.base_url, headers=live.headers, timeout=60) as c:
        yield c


def pool_of(live: LiveServer) -> ModelPool:
    pool: ModelPool = live.app.state.pool
    return pool


def listed(client: httpx.Client) -> list[str]:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    return [card["id"] for card in response.json()["data"]]


def greedy(client: httpx.Client, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "seed": 7}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    text: str = response.json()["choices"][0]["text"]
    return text


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not come true in time")
        time.sleep(0.05)


def test_a_quantized_variant_is_served_by_its_ref(live: LiveServer) -> None:
    with openai.OpenAI(base_url=live.base_url + "/v1", api_key=ADMIN_KEY, max_retries=0) as sdk:
        ids = [model.id for model in sdk.models.list().data]
        assert ids[0] == BUNDLED_MODEL_NAME
        assert {QUANTIZED, ENCRYPTED, OTHER_KEY_MODEL} <= set(ids)
        answer = sdk.chat.completions.create(
            model=QUANTIZED,
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=8,
            temperature=0,
        )
        assert answer.model == QUANTIZED
        assert answer.choices[0].message.content
        card = sdk.models.retrieve(QUANTIZED)
        assert (card.id, card.owned_by) == (QUANTIZED, "aicc")
        assert card.model_extra == {"max_model_len": 1024}
    assert QUANTIZED in pool_of(live).loaded_names


def test_an_encrypted_model_serves_what_the_plaintext_does(
    live: LiveServer, client: httpx.Client, store: Store
) -> None:
    assert greedy(client, ENCRYPTED) == greedy(client, BUNDLED_MODEL_NAME)
    encrypted_dir = store.model_dir / "gemma3" / "enc"
    assert [p.name for p in encrypted_dir.iterdir()] == [BUNDLED_FILE + ENCRYPTED_SUFFIX]
    plain = sorted(p.name for p in store.model_dir.rglob("*.gguf"))
    assert plain == sorted([BUNDLED_FILE, "gemma-3-270m-q4_0.gguf"])


def test_the_least_recently_used_idle_model_is_evicted(
    live: LiveServer, client: httpx.Client
) -> None:
    pool = pool_of(live)
    greedy(client, ENCRYPTED)
    assert pool.loaded_names == [BUNDLED_MODEL_NAME, ENCRYPTED]
    assert f'aicc_requests_running{{model="{ENCRYPTED}"' in client.get("/metrics").text
    greedy(client, QUANTIZED)
    assert pool.loaded_names == [BUNDLED_MODEL_NAME, QUANTIZED]
    scrape = client.get("/metrics").text
    assert f'aicc_requests_running{{model="{QUANTIZED}"' in scrape
    assert f'aicc_requests_running{{model="{ENCRYPTED}"' not in scrape
    assert client.get("/readyz").json() == {"status": "ready", "model": BUNDLED_MODEL_NAME}


def test_a_wrong_key_is_a_clear_error_and_the_server_goes_on(
    live: LiveServer, client: httpx.Client
) -> None:
    body = {"model": OTHER_KEY_MODEL, "prompt": PROMPT, "max_tokens": 4}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "model_decryption_failed"
    assert error["message"].startswith(f"cannot load model {OTHER_KEY_MODEL!r}: ")
    assert "model key does not match" in error["message"]
    assert OTHER_KEY_MODEL not in pool_of(live).loaded_names
    assert greedy(client, BUNDLED_MODEL_NAME)


def test_a_model_the_caller_may_not_use_is_neither_listed_nor_loaded(
    live: LiveServer, client: httpx.Client
) -> None:
    greedy(client, QUANTIZED)
    before = pool_of(live).loaded_names
    assert ENCRYPTED not in before
    key = live.create_user_key("pool-user", models=[BUNDLED_MODEL_NAME])
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=live.base_url, headers=headers, timeout=60) as user:
        assert listed(user) == [BUNDLED_MODEL_NAME]
        body = {"model": ENCRYPTED, "prompt": PROMPT, "max_tokens": 4}
        response = user.post("/v1/completions", json=body)
        assert response.status_code == 403
        assert user.get(f"/v1/models/{ENCRYPTED}").status_code == 403
    assert pool_of(live).loaded_names == before


def test_registry_changes_are_followed_without_a_restart(
    live: LiveServer, client: httpx.Client, store: Store
) -> None:
    pool = pool_of(live)
    import_model(store.registry, store.model_dir / BUNDLED_FILE, "hot")
    wait_for(lambda: "hot:latest" in listed(client), timeout=5)
    assert greedy(client, "hot:latest")
    body = {
        "model": "hot",  # the name alone means the `latest` tag
        "prompt": PROMPT,
        "max_tokens": 80,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        store.registry.remove("hot:latest")
        wait_for(lambda: "hot:latest" not in listed(client), timeout=5)
        gone = client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "model_not_found"
        # In use, and not evictable: no room for another model until the stream ends.
        assert "hot:latest" in pool.loaded_names
        busy = client.post("/v1/completions", json={**body, "model": QUANTIZED, "stream": False})
        assert busy.status_code == 503
        assert busy.headers["Retry-After"] == "1"
        assert busy.json()["error"]["code"] == "models_busy"
        events = [line.removeprefix("data: ") for line in lines if line]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 80
    wait_for(lambda: "hot:latest" not in pool.loaded_names, timeout=5)


def test_an_encrypted_model_as_the_configured_one(store: Store, live: LiveServer) -> None:
    with httpx.Client(base_url=live.base_url, headers=live.headers, timeout=60) as client:
        expected = greedy(client, BUNDLED_MODEL_NAME)
    settings = load_settings(
        model=ENCRYPTED, model_dir=store.model_dir, port=0, state_dir=store.state_dir,
        admin_key=ADMIN_KEY, model_key_file=store.key_file, **SERVER_SETTINGS,
        audit_enabled=False,  # a second gateway on the database: one audit chain writer
    )  # fmt: skip
    server = LiveServer(create_app(settings)).start()
    try:
        with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as c:
            assert greedy(c, ENCRYPTED) == expected
            ids = listed(c)
            assert ids[0] == ENCRYPTED
            assert ids.count(ENCRYPTED) == 1
            assert c.get("/readyz").json() == {"status": "ready", "model": ENCRYPTED}
    finally:
        server.stop()


def test_a_wrong_key_stops_start_up_with_a_clear_message(store: Store, tmp_path: Path) -> None:
    settings = load_settings(
        model=ENCRYPTED, model_dir=store.model_dir, port=0, state_dir=store.state_dir,
        admin_key=ADMIN_KEY, model_key_file=write_key(tmp_path / "wrong.key", OTHER_KEY),
        **SERVER_SETTINGS, audit_enabled=False,
    )  # fmt: skip
    app = create_app(settings)

    async def start() -> None:
        async with app.router.lifespan_context(app):
            raise AssertionError("the server started with a wrong key")

    with pytest.raises(ModelDecryptionError, match=f"^cannot load model {ENCRYPTED!r}: "):
        asyncio.run(start())
    assert "model key does not match" in app.state.startup_error.message


def split_gguf(source: Path, target: Path) -> list[Path]:
    """Rewrite `source` as a GGUF split in two (`<stem>-0000i-of-00002.gguf` beside `target`),
    as llama.cpp's gguf-split writes it."""
    reader = gguf.GGUFReader(source)
    architecture = reader.fields["general.architecture"].contents()
    max_tensors = -(-len(reader.tensors) // 2)
    target.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(target, architecture, split_max_tensors=max_tensors)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer's own
        kind = field.types[0]
        sub_kind = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_kind)
    for tensor in reader.tensors:
        shape = [int(size) for size in reversed(tensor.shape)]
        writer.add_tensor(tensor.name, tensor.data, raw_shape=shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(target.parent.glob(f"{target.stem}-*-of-*.gguf"))


def test_an_encrypted_multi_part_model_loads_from_memory(
    live: LiveServer, client: httpx.Client, store: Store, tmp_path: Path
) -> None:
    single = write_tiny_deepseek(tmp_path / "tiny.gguf", seed=3)
    parts = split_gguf(single, tmp_path / "split" / "tiny.gguf")
    assert [p.name for p in parts] == ["tiny-00001-of-00002.gguf", "tiny-00002-of-00002.gguf"]
    import_model(store.registry, single, "tiny:single")
    record = import_model(store.registry, parts[0], "tiny:split", encrypt_key=KEY)
    assert record.encrypted
    assert len(record.files) == 2
    wait_for(lambda: "tiny:split" in listed(client), timeout=5)
    assert greedy(client, "tiny:split") == greedy(client, "tiny:single")
    assert not list((store.model_dir / "tiny" / "split").glob("*.gguf"))
