"""What the gateway tells an engine worker at start: its settings and model, one JSON line on
the worker's stdin (not its arguments, which every user can read), and its bearer token, in
its environment (`AICC_WORKER_TOKEN`, as for a worker started by hand)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import SecretStr, ValidationError

from aicc.config import Settings
from aicc.errors import ConfigError
from aicc.store.local import LocalModel

WORKER_TOKEN_ENV = "AICC_WORKER_TOKEN"
"""The environment variable that gives a worker its bearer token."""

_TOKEN = re.compile(r"^[\x21-\x7e]{32,512}$")
"""Printable ASCII without spaces (it travels in a header), long enough not to be guessed."""

_GATEWAY_ONLY = frozenset({"secret_key", "admin_key", "ldap", "database_url"})
"""Settings a worker never sees (any other setting holding a secret is left out too)."""


def is_valid_worker_token(token: str) -> bool:
    """32 to 512 printable ASCII characters, no spaces."""
    return _TOKEN.fullmatch(token) is not None


def encode_worker_spec(settings: Settings, model: LocalModel, threads: int) -> bytes:
    """What a worker reads on stdin: its settings (no secrets, no TLS, loopback, `threads`)
    and the model file, as one JSON line."""
    raw = settings.model_dump(exclude=set(_GATEWAY_ONLY))
    plain = {name for name, value in raw.items() if not _holds_secret(value)}
    data = settings.model_dump(mode="json", include=plain)
    data.update(
        role="engine", workers=0, threads=threads, host="127.0.0.1", port=0,
        tls_cert=None, tls_key=None, tls_client_ca=None, metrics_port=None,
    )  # fmt: skip
    files = [str(path) for path in model.files]
    spec = {
        "settings": data,
        "model": {"name": model.name, "path": str(model.path), "is_bundled": model.is_bundled,
                  "files": files, "is_encrypted": model.is_encrypted},
    }  # fmt: skip
    return json.dumps(spec).encode() + b"\n"


def decode_worker_spec(line: bytes) -> tuple[Settings, LocalModel]:
    """The settings and model `encode_worker_spec` wrote. Raises ConfigError."""
    try:
        spec = json.loads(line)
        settings = Settings(**spec["settings"])
        entry = spec["model"]
        model = LocalModel(
            entry["name"], Path(entry["path"]), bool(entry["is_bundled"]),
            tuple(Path(path) for path in entry["files"]), bool(entry["is_encrypted"]),
        )  # fmt: skip
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise ConfigError(f"unreadable worker settings from the gateway: {exc}") from None
    return settings, model


def _holds_secret(value: object) -> bool:
    if isinstance(value, SecretStr):
        return True
    if isinstance(value, dict):
        return any(_holds_secret(item) for item in value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_holds_secret(item) for item in value)
    return False
