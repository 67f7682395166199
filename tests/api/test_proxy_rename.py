"""The public name put into a remote replica's stream events."""

from __future__ import annotations

import json

from aicc.api.proxy import model_renamer


def test_the_upstream_name_becomes_the_public_one_with_any_spacing() -> None:
    rename = model_renamer("Qwen/Qwen2.5-7B", "chat")
    compact = b'data: {"id":"x","model":"Qwen/Qwen2.5-7B","choices":[]}\n\n'
    spaced = b'data: {"id": "x", "model" :  "Qwen/Qwen2.5-7B", "choices": []}\n\n'
    assert json.loads(rename(compact)[6:])["model"] == "chat"
    assert json.loads(rename(spaced)[6:])["model"] == "chat"


def test_only_the_model_member_changes() -> None:
    rename = model_renamer("m", 'a "quoted" \\ name')
    event = b'data: {"model":"m","choices":[{"delta":{"content":"\\"model\\":\\"m\\""}}]}\n\n'
    payload = json.loads(rename(event)[6:])
    assert payload["model"] == 'a "quoted" \\ name'
    assert payload["choices"][0]["delta"]["content"] == '"model":"m"'


def test_other_events_pass_unchanged() -> None:
    rename = model_renamer("m", "chat")
    for event in (b"data: [DONE]\n\n", b": keep-alive\n\n", b'data: {"model":"m2"}\n\n'):
        assert rename(event) == event
    assert model_renamer("same", "same")(b'data: {"model":"same"}\n\n') == (
        b'data: {"model":"same"}\n\n'
    )
