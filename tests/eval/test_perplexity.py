"""Perplexity over sliding windows, on the bundled model and on a tiny random model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from aicc.errors import InvalidRequestError
from aicc.eval.perplexity import perplexity
from aicc.store.local import BUNDLED_MODEL_NAME
from tests.models.tiny_deepseek import write_tiny_deepseek

TEXT = (Path(__file__).parents[1] / "data" / "eval_text.txt").read_text(encoding="utf-8")


def expected_windows(num_tokens: int, ctx: int, stride: int) -> int:
    return 1 + max(0, math.ceil((num_tokens - ctx) / stride))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_deepseek(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def test_bundled_model_on_the_eval_text(model_dir: Path) -> None:
    result = perplexity(
        model_dir / f"{BUNDLED_MODEL_NAME}.gguf", TEXT, ctx=256, stride=192, threads=1
    )
    # Plain English prose: a real language model is far from uniform over 262k tokens, and an
    # off-by-one between logits and targets would send this into the thousands.
    assert math.isfinite(result.ppl)
    assert 1.0 < result.ppl < 100.0
    assert result.tokens > 300  # every token but the first, of ~2 KB of prose
    assert result.windows == expected_windows(result.tokens + 1, 256, 192) == 3


def test_deterministic_and_every_token_scored_once(tiny: Path) -> None:
    first = perplexity(tiny, TEXT, ctx=512, stride=256, threads=1)
    assert perplexity(tiny, TEXT, ctx=512, stride=256, threads=1) == first
    assert math.isfinite(first.ppl)
    assert first.ppl > 1.0
    num_tokens = first.tokens + 1
    assert first.windows == expected_windows(num_tokens, 512, 256) > 1
    one_window = perplexity(tiny, TEXT, ctx=4096, stride=256, threads=1)
    assert (one_window.tokens, one_window.windows) == (first.tokens, 1)
    short = perplexity(tiny, TEXT, ctx=64, stride=63, threads=1)
    assert (short.tokens, short.windows) == (first.tokens, expected_windows(num_tokens, 64, 63))
    # Less context per token can only be scored differently, not identically.
    assert short.ppl != one_window.ppl


@pytest.mark.parametrize(
    ("ctx", "stride", "expected"),
    [
        (1, 1, "ctx must be at least 2"),
        (64, 64, "stride must lie in"),
        (64, 0, "stride must lie in"),
        (1 << 16, 256, "exceeds the model's context of 4096"),
    ],
)
def test_bad_windows(tiny: Path, ctx: int, stride: int, expected: str) -> None:
    with pytest.raises(InvalidRequestError, match=expected):
        perplexity(tiny, TEXT, ctx=ctx, stride=stride, threads=1)


def test_text_too_short(tiny: Path) -> None:
    with pytest.raises(InvalidRequestError, match="too short"):
        perplexity(tiny, "", ctx=64, stride=32, threads=1)
