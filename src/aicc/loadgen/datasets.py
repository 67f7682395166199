"""Prompts for a benchmark: random ones of a given length, or a JSONL file.

Random prompts are built from common English words, each of which is one token in the
tokenizers of current models (SentencePiece and BPE vocabularies of 32k+ entries), so
`input_len` words come to about `input_len` prompt tokens (a chat template adds its own few).
This keeps the generator independent of the server's tokenizer; the exact prompt token counts
come back in each response's `usage` and are what the statistics use.

A JSONL dataset has one JSON object per line: `{"prompt": "..."}` or
`{"messages": [{"role": "user", "content": "..."}, ...]}`, each with an optional positive
`"max_tokens"` that replaces `--output-len` for that line. Blank lines are skipped.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

MAX_DATASET_BYTES = 256 * 1024 * 1024
ROLES = ("system", "developer", "user", "assistant")

_WORD_TEXT = """
the of and to in is it that for on was with as at by this from be are have not but or all one
had they were which when we there can an your more will up out so what about if time some
would other into has two like them see day could people than first water been call who now
find long down get come made may part over new sound take only little work know place year
live back give most very after thing our just name good man think say great where help through
much line right too mean old any same tell boy follow came want show also around form three
small set put end does another well large must big even such turn here why ask went men read
need land different home us move try kind hand picture again change off play spell air away
animal house point page letter mother answer found study still learn should world high every
near add food between own below country plant last school father keep tree never start city
earth eye light thought head under story saw left few while along might close something seem
next hard open example begin life always those both paper together got group often run
important until children side feet car mile night walk white sea began grow took river four
carry state once book hear stop without second later miss idea enough eat face watch far real
almost let above girl sometimes mountain cut young talk soon list song being leave family
"""
WORDS = tuple(_WORD_TEXT.split())
"""About 260 frequent words; each is a single token in common LLM vocabularies."""


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request's input: a text prompt, or chat messages (then `text` is their contents)."""

    text: str
    messages: tuple[Message, ...] | None = None
    """Set for chat datasets; a text prompt is sent to the chat endpoint as one user message."""
    max_tokens: int | None = None
    """The line's own output length; None means the run's `--output-len`."""

    @property
    def chat_messages(self) -> tuple[Message, ...]:
        return self.messages if self.messages is not None else (Message("user", self.text),)


def random_prompts(num_prompts: int, input_len: int, seed: int) -> list[Prompt]:
    """`num_prompts` prompts of `input_len` random words each, the same for the same seed.

    Raises:
        DatasetError: a count or length below 1.
    """
    if num_prompts < 1 or input_len < 1:
        raise DatasetError("random prompts need --num-prompts and --input-len of at least 1")
    rng = random.Random(seed)
    return [Prompt(" ".join(rng.choices(WORDS, k=input_len))) for _ in range(num_prompts)]


def load_jsonl(path: Path) -> list[Prompt]:
    """Every prompt in a JSONL file, in file order.

    Raises:
        DatasetError: unreadable or oversized file, a line that is not a valid entry, or no
            entries at all.
    """
    try:
        size = path.stat().st_size
        if size > MAX_DATASET_BYTES:
            raise DatasetError(f"{path}: {size} bytes is larger than {MAX_DATASET_BYTES}")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise DatasetError(f"cannot read the dataset {path}: {exc.strerror or exc}") from exc
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                prompts.append(parse_entry(line))
            except DatasetError as exc:
                raise DatasetError(f"{path}:{number}: {exc}") from exc
    if not prompts:
        raise DatasetError(f"{path}: no prompts (expected one JSON object per line)")
    return prompts


def parse_entry(line: str) -> Prompt:
    """One JSONL line as a prompt.

    Raises:
        DatasetError: not JSON, or not an object with a usable `prompt` or `messages`.
    """
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"not JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(entry, dict):
        raise DatasetError('expected an object with "prompt" or "messages"')
    max_tokens = entry.get("max_tokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise DatasetError('"max_tokens" must be a positive integer')
    if "prompt" in entry and "messages" in entry:
        raise DatasetError('give either "prompt" or "messages", not both')
    if "prompt" in entry:
        prompt = entry["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise DatasetError('"prompt" must be a non-empty string')
        return Prompt(prompt, max_tokens=max_tokens)
    if "messages" in entry:
        messages = _parse_messages(entry["messages"])
        return Prompt("\n".join(m.content for m in messages), messages, max_tokens)
    raise DatasetError('expected an object with "prompt" or "messages"')


def _parse_messages(value: object) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise DatasetError('"messages" must be a non-empty list')
    messages = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise DatasetError(f'"messages"[{index}] must be an object with role and content')
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise DatasetError(f'"messages"[{index}].role must be one of {", ".join(ROLES)}')
        if not isinstance(content, str):
            raise DatasetError(f'"messages"[{index}].content must be a string')
        messages.append(Message(role, content))
    return tuple(messages)


def take(prompts: list[Prompt], num_prompts: int | None) -> list[Prompt]:
    """The first `num_prompts` prompts, going round the list again when it is shorter;
    all of them when `num_prompts` is None."""
    if num_prompts is None:
        return list(prompts)
    return [prompts[i % len(prompts)] for i in range(num_prompts)]
