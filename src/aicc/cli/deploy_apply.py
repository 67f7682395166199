"""`aicc deploy apply FILE`: deployments read from YAML or JSON, sent to `PUT
/admin/deployments/{model}`.

A replica's `api_key_env: NAME` or `api_key_file: PATH` is read here, from the CLI's
environment or files, and sent as the literal `api_key` (the server stores it encrypted); the
key never appears on a command line, and the server never reads its own variables or files for
an API-made deployment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from aicc.cli.client import CliError

MAX_FILE_BYTES = 1 << 20


def read_deployments(path: Path) -> list[dict[str, Any]]:
    """The deployments in `path` (one mapping or a list of them), keys taken from the
    environment. Raises `CliError` naming the problem."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise CliError(f"{path} is larger than {MAX_FILE_BYTES >> 20} MiB")
        text = path.read_text()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CliError(f"{path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as exc:
        raise CliError(f"{path} is not valid YAML or JSON: {exc}") from None
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(item, dict) for item in items):
        raise CliError(f"{path} must hold a deployment (a mapping) or a list of them")
    deployments = []
    for number, item in enumerate(items, start=1):
        model = item.get("model")
        if not isinstance(model, str) or not model:
            raise CliError(f"{path}: deployment {number} has no `model` (its public name)")
        deployments.append(_with_keys(item, model))
    names = [d["model"] for d in deployments]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise CliError(f"{path}: deployment {duplicates[0]!r} appears twice")
    return deployments


def _with_keys(deployment: dict[str, Any], model: str) -> dict[str, Any]:
    """A copy whose replicas carry `api_key` read from their `api_key_env` variable."""
    result = dict(deployment)
    variants = deployment.get("variants")
    if isinstance(variants, list):
        result["variants"] = [
            {**v, "replicas": _replicas(v["replicas"], model)}
            if isinstance(v, dict) and isinstance(v.get("replicas"), list)
            else v
            for v in variants
        ]
    if isinstance(deployment.get("fallback"), list):
        result["fallback"] = _replicas(deployment["fallback"], model)
    return result


def _replicas(replicas: list[Any], model: str) -> list[Any]:
    result = []
    for replica in replicas:
        if not isinstance(replica, dict):
            result.append(replica)
            continue
        if "api_key" in replica:
            raise CliError(
                f"deployment {model!r}: do not write a key into the file; "
                "set `api_key_env: NAME` and export NAME in this shell"
            )
        key = _key_of(replica, model)
        if key is None:
            result.append(replica)
            continue
        copy = {k: v for k, v in replica.items() if k not in ("api_key_env", "api_key_file")}
        copy["api_key"] = key
        result.append(copy)
    return result


def _key_of(replica: dict[str, Any], model: str) -> str | None:
    """The key named by the replica's `api_key_env` or `api_key_file`, read here (None
    without either). Raises CliError when it cannot be read."""
    name, path = replica.get("api_key_env"), replica.get("api_key_file")
    if isinstance(name, str):
        key = os.environ.get(name, "").strip()
        if not key:
            raise CliError(
                f"deployment {model!r}: the variable {name} (api_key_env) is not set here; "
                f"export it before `aicc deploy apply`"
            )
        return key
    if isinstance(path, str):
        try:
            key = Path(path).expanduser().read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(
                f"deployment {model!r}: cannot read api_key_file {path!r}: {exc}"
            ) from None
        if not key:
            raise CliError(f"deployment {model!r}: api_key_file {path!r} is empty")
        return key
    return None
