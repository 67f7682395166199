"""The audit detail of administrative calls: secrets masked at any depth."""

from __future__ import annotations

import json
from typing import Any

from aicc.api.observe import change_detail


def scope(path: str, method: str = "PUT") -> dict[str, Any]:
    return {"type": "http", "path": path, "method": method}


def detail(body: Any, path: str = "/admin/deployments/chat") -> Any:
    return change_detail(scope(path), json.dumps(body).encode())


def test_secrets_are_masked_in_nested_objects_and_lists() -> None:
    body = {
        "variants": [{"name": "v1", "replicas": [
            {"url": "http://up", "api_key": "sk-1", "timeouts": {"token": "t"}}]}],
        "fallback": [{"url": "http://fb", "api_key": "sk-2"}, "plain"],
        "password": "p", "keep": {"nested": [[{"secret_key": "s"}]]},
    }  # fmt: skip
    masked = detail(body)["request"]
    replica = masked["variants"][0]["replicas"][0]
    assert replica == {"url": "http://up", "api_key": "***", "timeouts": {"token": "***"}}
    assert masked["fallback"] == [{"url": "http://fb", "api_key": "***"}, "plain"]
    assert masked["password"] == "***"
    assert masked["keep"] == {"nested": [[{"secret_key": "***"}]]}
    assert "sk-1" not in json.dumps(masked)
    assert "sk-2" not in json.dumps(masked)


def test_very_deep_values_are_masked_whole() -> None:
    deep: Any = {"api_key": "sk-deep"}
    for _ in range(100):
        deep = {"x": [deep]}
    text = json.dumps(detail({"deep": deep}))
    assert "sk-deep" not in text
    assert "***" in text
    too_deep = b"[" * 100_000 + b"]" * 100_000  # beyond the JSON parser's recursion limit
    assert change_detail(scope("/admin/x"), too_deep) is None


def test_only_administrative_changes_are_detailed() -> None:
    assert change_detail(scope("/admin/deployments", "GET"), b"{}") is None
    assert change_detail(scope("/v1/chat/completions", "POST"), b'{"api_key": "k"}') is None
    assert change_detail(scope("/admin/x", "POST"), b"not json") is None
    assert change_detail(scope("/admin/x", "POST"), b"[1]") is None
    login = change_detail(scope("/auth/login", "POST"), b'{"username": "u", "password": "p"}')
    assert login == {"username": "u"}
