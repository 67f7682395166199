"""Two models, one text: perplexity of each and the relative change (the quantization cost)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from aicc.eval.perplexity import PerplexityResult, perplexity
from aicc.store.gguf_check import InvalidModelFileError, check_gguf
from aicc.store.registry import quantization_name
from aicc.units import human_size

HEADERS = ("MODEL", "QUANT", "SIZE", "PPL", "CHANGE")


@dataclass(frozen=True, slots=True)
class ModelScore:
    """One model's row of a comparison."""

    label: str
    """What the user called the model (a ref or a path)."""
    quantization: str | None
    size_bytes: int
    """Of the plaintext file(s)."""
    result: PerplexityResult
    change_pct: float | None
    """Perplexity change against the first model, in percent; None for the first model."""


def compare(
    models: list[tuple[str, Path]],
    text: str,
    *,
    ctx: int = 512,
    stride: int = 256,
    threads: int | None = None,
) -> list[ModelScore]:
    """Score each `(label, plaintext path)` on `text`; changes are relative to the first.

    Raises what `perplexity` raises.
    """
    scores: list[ModelScore] = []
    for label, path in models:
        result = perplexity(path, text, ctx=ctx, stride=stride, threads=threads)
        change = None if not scores else relative_change(scores[0].result.ppl, result.ppl)
        scores.append(
            ModelScore(label, read_quantization(path), path.stat().st_size, result, change)
        )
    return scores


def relative_change(reference: float, value: float) -> float:
    """(value - reference) / reference in percent: +1.5 means 1.5 % higher perplexity."""
    return (value - reference) / reference * 100.0


def table_rows(scores: list[ModelScore]) -> list[tuple[str, ...]]:
    """The rows under `HEADERS`."""
    return [
        (
            score.label,
            score.quantization or "-",
            human_size(score.size_bytes),
            f"{score.result.ppl:.4f}" if math.isfinite(score.result.ppl) else "inf",
            "-" if score.change_pct is None else f"{score.change_pct:+.2f}%",
        )
        for score in scores
    ]


def read_quantization(path: Path) -> str | None:
    """The GGUF's `general.file_type` as a name (`Q4_K_M`); None if absent or unreadable."""

    try:
        with path.open("rb") as file:
            header = check_gguf(file, os.fstat(file.fileno()).st_size, name=path.name)
    except (OSError, InvalidModelFileError):
        return None
    return quantization_name(header.metadata.get("general.file_type"))
