"""Ways to split a model's output into stream pieces, for parsers that must not care."""

from __future__ import annotations

import random
from collections.abc import Iterator


def chunkings(text: str, seed: int = 0) -> Iterator[list[str]]:
    """One piece, one character at a time, every two-way split, and random chunkings."""
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    rng = random.Random(seed)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 8))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
