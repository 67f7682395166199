"""Upstream keys of API-made deployments: sealed with AES-256-GCM under the server secret,
bound to the deployment and the replica URL; a literal key only through the admin API."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from pydantic import ValidationError

from aicc.auth.tokens import SealError
from aicc.router.keys import (
    SEALED_FIELD,
    SealedKeyError,
    open_key,
    opened_settings,
    seal_key,
    sealed_settings,
)
from aicc.router.settings import DeploymentSettings

SECRET = b"s" * 32
KEY = "sk-upstream-secret-value-0123456789"


def deployment(**replica: Any) -> dict[str, Any]:
    remote = {"url": "https://up.example:8443", "model": "m", **replica}
    return {"model": "chat", "variants": [{"name": "v1", "weight": 1, "replicas": [remote]}],
            "fallback": [{"url": "http://fb:1", "api_key": "fallback-key-000"}]}  # fmt: skip


def test_a_sealed_key_opens_only_for_its_secret_model_and_url() -> None:
    sealed = seal_key(SECRET, KEY, model="chat", url="https://up")
    assert open_key(SECRET, sealed, model="chat", url="https://up") == KEY
    assert len(base64.b64decode(sealed)) == 12 + len(KEY) + 16  # nonce, ciphertext, tag
    assert seal_key(SECRET, KEY, model="chat", url="https://up") != sealed  # random nonce
    for secret, model, url in ((b"t" * 32, "chat", "https://up"), (SECRET, "other", "https://up"),
                               (SECRET, "chat", "https://elsewhere")):  # fmt: skip
        with pytest.raises(SealError):
            open_key(secret, sealed, model=model, url=url)
    tampered = base64.b64encode(b"\0" * 40).decode()
    with pytest.raises(SealError):
        open_key(SECRET, tampered, model="chat", url="https://up")


def test_stored_settings_hold_ciphertext_only_and_open_to_the_same_settings() -> None:
    settings = DeploymentSettings.from_api(deployment(api_key=KEY))
    stored = sealed_settings(settings, SECRET)
    text = json.dumps(stored)
    assert KEY not in text
    assert "fallback-key-000" not in text
    assert "api_key" not in stored["variants"][0]["replicas"][0]
    assert SEALED_FIELD in stored["variants"][0]["replicas"][0]
    assert SEALED_FIELD in stored["fallback"][0]
    opened = opened_settings(json.loads(text), SECRET)
    assert opened == settings
    replica = opened.variants[0].replicas[0]
    assert replica.api_key is not None
    assert replica.api_key.get_secret_value() == KEY


def test_a_stored_key_under_another_secret_is_refused_without_naming_the_key() -> None:
    settings = DeploymentSettings.from_api(deployment(api_key=KEY))
    stored = sealed_settings(settings, SECRET)
    with pytest.raises(SealedKeyError, match=r"'chat'.*does not decrypt") as caught:
        opened_settings(stored, b"x" * 32)
    assert KEY not in caught.value.message
    moved = json.loads(json.dumps(stored))
    moved["variants"][0]["replicas"][0]["url"] = "https://attacker:1"
    with pytest.raises(SealedKeyError):
        opened_settings(moved, SECRET)
    with pytest.raises(SealedKeyError, match="not a settings object"):
        opened_settings(["not", "a", "dict"], SECRET)


def test_settings_without_keys_round_trip() -> None:
    data = {**deployment(), "fallback": []}
    settings = DeploymentSettings.from_api(data)
    assert opened_settings(sealed_settings(settings, SECRET), SECRET) == settings


def test_a_literal_key_is_refused_outside_the_admin_api() -> None:
    with pytest.raises(ValidationError, match="literal key is not allowed"):
        DeploymentSettings.model_validate(deployment(api_key=KEY))
    with pytest.raises(ValidationError, match="not several"):
        DeploymentSettings.model_validate(deployment(api_key_env="UP_KEY", api_key_file="k"))
    # The server's own variables and files never become a key sent to an API-given URL.
    for server_side in ({"api_key_env": "HOME"}, {"api_key_file": "/etc/passwd"}):
        with pytest.raises(ValidationError, match="through the API"):
            DeploymentSettings.from_api(deployment(**server_side))
    local = {"model": "c", "variants": [
        {"name": "a", "weight": 1, "replicas": [{"local": "x", "api_key": KEY}]}]}  # fmt: skip
    with pytest.raises(ValidationError, match="local replica takes no api_key"):
        DeploymentSettings.from_api(local)
    settings = DeploymentSettings.from_api(deployment(api_key=KEY))
    assert KEY not in repr(settings)
    assert KEY not in settings.model_dump_json()


def test_a_dump_of_config_settings_validates_again() -> None:
    settings = DeploymentSettings.model_validate(
        deployment(api_key_env="UP_KEY") | {"fallback": []}
    )
    dumped = settings.model_dump(mode="json")
    assert dumped["variants"][0]["replicas"][0]["api_key"] is None
    assert DeploymentSettings.model_validate(dumped) == settings  # as engine workers read it
