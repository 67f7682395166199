"""Log-probabilities in OpenAI's two shapes: chat (`content` entries) and legacy completions."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aicc.engine.types import TokenLogprob, TopLogprob

Json = dict[str, Any]


def chat_logprobs(tokens: Iterable[TokenLogprob]) -> Json:
    """`choices[].logprobs` of a chat completion (or of one streamed chunk)."""
    return {
        "content": [
            {**_entry(token), "top_logprobs": [_entry(top) for top in token.top]}
            for token in tokens
        ],
        "refusal": None,
    }


def completion_logprobs(tokens: Iterable[TokenLogprob], text_offset: int = 0) -> Json:
    """`choices[].logprobs` of a legacy text completion: parallel lists per token."""
    result: Json = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token in tokens:
        text = _text(token.token)
        result["tokens"].append(text)
        result["token_logprobs"].append(token.logprob)
        result["top_logprobs"].append({_text(top.token): top.logprob for top in token.top})
        result["text_offset"].append(text_offset)
        text_offset += len(text)
    return result


def _entry(token: TokenLogprob | TopLogprob) -> Json:
    return {"token": _text(token.token), "logprob": token.logprob, "bytes": list(token.token)}


def _text(data: bytes) -> str:
    # A token may hold part of a UTF-8 character; its exact bytes are in `bytes`.
    return data.decode("utf-8", errors="replace")
