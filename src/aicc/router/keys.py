"""Upstream keys of deployments made through the admin API, sealed for the database.

A literal `api_key` is stored as `api_key_encrypted`: AES-256-GCM under a key derived from the
server secret (HKDF-SHA256, info `UPSTREAM_KEY_INFO`), a random 96-bit nonce, base64 of
nonce ‖ ciphertext. The public model name and the replica URL are authenticated with it, so a
sealed key moved to another deployment or URL does not open.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import ValidationError

from aicc.auth.tokens import SealError, open_sealed, seal
from aicc.errors import ConfigError
from aicc.router.settings import DeploymentSettings

UPSTREAM_KEY_INFO = b"aicc upstream key v1"
SEALED_FIELD = "api_key_encrypted"


class SealedKeyError(ConfigError):
    """A stored deployment cannot be opened: a key sealed under another server secret, a
    tampered row, or settings that no longer validate."""

    code = "sealed_key_invalid"


def key_context(model: str, url: str) -> bytes:
    """What a sealed key is bound to: the deployment's public name and the replica's URL."""
    return model.encode() + b"\x00" + url.encode()


def seal_key(secret: bytes, key: str, *, model: str, url: str) -> str:
    return seal(secret, key.encode(), context=key_context(model, url), info=UPSTREAM_KEY_INFO)


def open_key(secret: bytes, sealed: str, *, model: str, url: str) -> str:
    """Raises `SealError` when the value or its (model, URL) does not authenticate."""
    plaintext = open_sealed(secret, sealed, context=key_context(model, url), info=UPSTREAM_KEY_INFO)
    return plaintext.decode()


def sealed_settings(settings: DeploymentSettings, secret: bytes) -> dict[str, Any]:
    """The settings as JSON for the database: each literal key replaced by its ciphertext."""
    data: dict[str, Any] = settings.model_dump(mode="json", exclude_none=True)
    for dumped, replica in zip(_replicas(data), _all_replicas(settings), strict=True):
        dumped.pop("api_key", None)
        if replica.api_key is not None:
            dumped[SEALED_FIELD] = seal_key(
                secret,
                replica.api_key.get_secret_value(),
                model=settings.model,
                url=replica.url or "",
            )
    return data


def opened_settings(data: Any, secret: bytes) -> DeploymentSettings:
    """Reverse `sealed_settings`. Raises `SealedKeyError` (another secret, tampering, or
    settings that do not validate any more); its message never holds a key."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), str):
        raise SealedKeyError("the stored deployment is not a settings object")
    model = data["model"]
    opened = copy.deepcopy(data)  # the caller's row stays as read
    for replica in _replicas(opened):
        sealed = replica.pop(SEALED_FIELD, None)
        if sealed is None:
            continue
        try:
            replica["api_key"] = open_key(
                secret, str(sealed), model=model, url=str(replica.get("url", ""))
            )
        except (SealError, UnicodeDecodeError):
            raise SealedKeyError(
                f"the upstream key of deployment {model!r} does not decrypt "
                "(was the server secret changed?)"
            ) from None
    try:
        return DeploymentSettings.from_api(opened)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise SealedKeyError(
            f"the stored deployment {model!r} is not valid any more: {where}: {first['msg']}"
        ) from None


def _replicas(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The replica dicts of dumped settings, in `_all_replicas` order."""
    found: list[dict[str, Any]] = []
    for variant in data.get("variants") or []:
        if isinstance(variant, dict) and isinstance(variant.get("replicas"), list):
            found.extend(r for r in variant["replicas"] if isinstance(r, dict))
    found.extend(r for r in data.get("fallback") or [] if isinstance(r, dict))
    return found


def _all_replicas(settings: DeploymentSettings) -> list[Any]:
    return [r for v in settings.variants for r in v.replicas] + list(settings.fallback)
