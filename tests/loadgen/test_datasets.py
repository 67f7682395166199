"""Random and JSONL prompt datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aicc.loadgen.datasets import (
    WORDS,
    DatasetError,
    Message,
    Prompt,
    load_jsonl,
    random_prompts,
    take,
)


def test_random_prompts_have_the_length_and_are_seeded() -> None:
    prompts = random_prompts(5, 40, seed=7)
    assert len(prompts) == 5
    assert all(len(p.text.split()) == 40 for p in prompts)
    assert all(word in WORDS for p in prompts for word in p.text.split())
    assert len({p.text for p in prompts}) == 5
    assert random_prompts(5, 40, seed=7) == prompts
    assert random_prompts(5, 40, seed=8) != prompts
    assert prompts[0].chat_messages == (Message("user", prompts[0].text),)


def test_random_prompts_refuse_zero() -> None:
    with pytest.raises(DatasetError, match="at least 1"):
        random_prompts(0, 10, seed=0)


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_prompts_and_messages(tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = write_lines(
        tmp_path / "data.jsonl",
        json.dumps({"prompt": "Tell me a story.", "max_tokens": 16}),
        "",
        "   ",
        json.dumps({"messages": messages, "extra": "ignored"}),
    )
    prompts = load_jsonl(path)
    assert prompts == [
        Prompt("Tell me a story.", None, 16),
        Prompt("Be brief.\nHi", (Message("system", "Be brief."), Message("user", "Hi")), None),
    ]
    assert prompts[1].chat_messages == prompts[1].messages


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a"', "not JSON"),
        ("[1, 2]", 'expected an object with "prompt" or "messages"'),
        ('{"text": "a"}', 'expected an object with "prompt" or "messages"'),
        ('{"prompt": ""}', '"prompt" must be a non-empty string'),
        ('{"prompt": 5}', '"prompt" must be a non-empty string'),
        ('{"prompt": "a", "messages": []}', "not both"),
        ('{"messages": []}', '"messages" must be a non-empty list'),
        ('{"messages": ["hi"]}', r'"messages"\[0\] must be an object'),
        ('{"messages": [{"role": "robot", "content": "x"}]}', r'"messages"\[0\].role'),
        ('{"messages": [{"role": "user", "content": 3}]}', r'"messages"\[0\].content'),
        ('{"prompt": "a", "max_tokens": 0}', "positive integer"),
        ('{"prompt": "a", "max_tokens": "8"}', "positive integer"),
        ('{"prompt": "a", "max_tokens": true}', "positive integer"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path / "data.jsonl", '{"prompt": "fine"}', "", line)
    with pytest.raises(DatasetError, match=message) as caught:
        load_jsonl(path)
    assert str(caught.value).startswith(f"{path}:3: ")


def test_empty_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no prompts"):
        load_jsonl(write_lines(tmp_path / "empty.jsonl", "", ""))
    with pytest.raises(DatasetError, match="cannot read the dataset"):
        load_jsonl(tmp_path / "missing.jsonl")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_jsonl(binary)


def test_take_cycles_or_keeps_all() -> None:
    prompts = [Prompt("a"), Prompt("b"), Prompt("c")]
    assert [p.text for p in take(prompts, 7)] == ["a", "b", "c", "a", "b", "c", "a"]
    assert take(prompts, 2) == prompts[:2]
    assert take(prompts, None) == prompts
