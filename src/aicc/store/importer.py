"""`aicc models import PATH --name REF`: a GGUF or safetensors file already on disk (air-gapped
sites) copied into the model directory, checked, and registered."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from aicc.errors import ConflictError, InvalidRequestError
from aicc.store.gguf_check import check_model_file, refuse_format
from aicc.store.names import format_ref, parse_ref, safe_join, validate_file_name
from aicc.store.registry import ModelRecord, ModelRegistry

COPY_BYTES = 4 << 20
_FIRST_PART = re.compile(r"^(?P<stem>.+)-00001-of-(?P<count>\d{5})\.gguf$")


def import_model(
    registry: ModelRegistry,
    source: Path,
    ref: str,
    *,
    move: bool = False,
    encrypt_key: bytes | None = None,
) -> ModelRecord:
    """Copy (or move) `source` — with its sibling parts when it is part 1 of a multi-part GGUF —
    into the model's directory, check each copy, and register it with source `import:PATH`.

    Raises InvalidModelFileError (refused format, malformed), InvalidRequestError (bad ref,
    missing file), ConflictError (ref exists).
    """
    name, tag = parse_ref(ref)
    ref = format_ref(name, tag)
    sources = _source_files(source)
    for path in sources:
        check_model_file(path)  # before copying anything large
    if registry.find(ref) is not None:
        raise ConflictError(f"model {ref!r} already exists; `aicc models rm {ref}` first")
    directory = safe_join(registry.model_dir, name, tag)
    directory.mkdir(parents=True, exist_ok=True)
    placed: list[Path] = []
    temps: list[Path] = []
    try:
        digests = []
        for path in sources:
            file_name = validate_file_name(path.name)
            temp = directory / f".{file_name}.{os.getpid()}.tmp"
            temps.append(temp)
            digests.append(_copy(path, temp))
            check_model_file(temp, name=file_name)  # what was copied, not what was checked
        if encrypt_key is not None:
            from aicc.store.crypto import ENCRYPTED_SUFFIX, encrypt_file

            for path, temp in zip(sources, temps, strict=True):
                target = directory / (path.name + ENCRYPTED_SUFFIX)
                encrypt_file(temp, target, encrypt_key)
                placed.append(target)
            size = sum(temp.stat().st_size for temp in temps)
            record = registry.register(
                ref, placed, source=f"import:{source.resolve()}", metadata_from=temps[0],
                sha256=digests, size_bytes=size, encrypted=True,
            )  # fmt: skip
        else:
            for path, temp in zip(sources, temps, strict=True):
                target = directory / path.name
                os.replace(temp, target)
                placed.append(target)
            record = registry.register(
                ref, placed, source=f"import:{source.resolve()}", sha256=digests
            )
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        _remove_empty(directory)
        raise
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    if move:
        for path in sources:
            path.unlink()
    return record


def _source_files(source: Path) -> list[Path]:
    refuse_format(source)
    if not source.is_file():
        raise InvalidRequestError(f"{str(source)!r} is not a file")
    match = _FIRST_PART.match(source.name)
    if match is None:
        return [source]
    stem, count = match.group("stem"), match.group("count")
    parts = [source.with_name(f"{stem}-{i:05d}-of-{count}.gguf") for i in range(1, int(count) + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise InvalidRequestError(f"multi-part model: {', '.join(missing)} missing next to it")
    return parts


def _copy(source: Path, target: Path) -> str:
    """Copy and hash in one read; fsync before the rename makes it durable."""
    digest = hashlib.sha256()
    with source.open("rb") as src, target.open("wb") as dst:
        while data := src.read(COPY_BYTES):
            digest.update(data)
            dst.write(data)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def _remove_empty(directory: Path) -> None:
    for path in (directory, directory.parent):
        try:
            path.rmdir()
        except OSError:
            return
