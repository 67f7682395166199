"""Quantize the bundled model with llama.cpp, register it, and generate with the result."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from aicc.db import Database
from aicc.store.local import BUNDLED_MODEL_NAME
from aicc.store.ops import quantize_model
from aicc.store.registry import ModelRegistry
from tests.store.greedy import greedy_tokens


def test_quantize_bundled_model_to_q8_0(model_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "models"
    store.mkdir()
    bundled = f"{BUNDLED_MODEL_NAME}.gguf"
    os.link(model_dir / bundled, store / bundled)  # the bundled model, without a copy
    database = Database(f"sqlite:///{tmp_path / 'state' / 'aicc.db'}")
    database.migrate()
    registry = ModelRegistry(database, store)

    record = quantize_model(registry, store, BUNDLED_MODEL_NAME, "Q8_0", "gemma3:q8", None)

    assert record.ref == "gemma3:q8"
    assert (record.parent, record.source) == (BUNDLED_MODEL_NAME, f"quantize:{BUNDLED_MODEL_NAME}")
    assert (record.quantization, record.architecture, record.encrypted) == ("Q8_0", "gemma3", False)
    (path,) = record.paths(store)
    assert path == store / "gemma3" / "q8" / "gemma-3-270m-q8_0.gguf"
    assert record.sha256 == (hashlib.sha256(path.read_bytes()).hexdigest(),)
    assert record.size_bytes == path.stat().st_size > (store / bundled).stat().st_size
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
    assert registry.get("gemma3:q8") == record

    tokens = greedy_tokens(path)
    assert len(tokens) == 16
    database.close()
