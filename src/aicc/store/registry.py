"""The model registry: one row per `name:tag` in the state database, files under
`<model_dir>/<name>/<tag>/`."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from aicc.db import Database
from aicc.db.models import ModelRow, utcnow
from aicc.errors import ConflictError, InvalidRequestError, ModelNotFoundError
from aicc.store.gguf_check import GGUF_MAGIC, GgufHeader, check_gguf
from aicc.store.names import format_ref, parse_ref, safe_join, validate_file_name

__all__ = ["ModelMetadata", "ModelRecord", "ModelRegistry", "parse_ref", "read_metadata"]


@dataclass(frozen=True, slots=True)
class ModelRecord:
    name: str
    tag: str
    source: str
    files: tuple[str, ...]
    sha256: tuple[str, ...]
    size_bytes: int
    architecture: str | None
    parameter_count: int | None
    quantization: str | None
    context_length: int | None
    chat_template: str | None
    encrypted: bool
    parent: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def ref(self) -> str:
        return format_ref(self.name, self.tag)

    def directory(self, model_dir: Path) -> Path:
        return safe_join(model_dir, self.name, self.tag)

    def paths(self, model_dir: Path) -> list[Path]:
        """Absolute paths of the files, load order; each checked to be inside `model_dir`."""
        return [safe_join(model_dir, self.name, self.tag, file) for file in self.files]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What the registry keeps from a GGUF header."""

    architecture: str | None = None
    parameter_count: int | None = None
    quantization: str | None = None
    context_length: int | None = None
    chat_template: str | None = None


class ModelRegistry:
    """Rows of the `models` table and the directories they own. Calls are synchronous."""

    def __init__(self, database: Database, model_dir: Path) -> None:
        self.database = database
        self.model_dir = model_dir

    def list(self) -> builtins.list[ModelRecord]:
        with self.database.session() as session:
            rows = session.scalars(select(ModelRow).order_by(ModelRow.name, ModelRow.tag))
            return [_record(row) for row in rows]

    def find(self, ref: str) -> ModelRecord | None:
        name, tag = parse_ref(ref)
        with self.database.session() as session:
            row = _row(session, name, tag)
            return None if row is None else _record(row)

    def get(self, ref: str) -> ModelRecord:
        """Raises ModelNotFoundError (and InvalidRequestError for a malformed ref)."""
        record = self.find(ref)
        if record is None:
            raise ModelNotFoundError(
                f"model {ref!r} is not registered; `aicc models list` shows what is"
            )
        return record

    def register(
        self,
        ref: str,
        files: builtins.list[Path],
        *,
        source: str,
        parent: str | None = None,
        metadata_from: Path | None = None,
        sha256: builtins.list[str] | None = None,
        size_bytes: int | None = None,
        encrypted: bool = False,
    ) -> ModelRecord:
        """Record files already placed in the model's directory.

        Computes SHA-256 and size unless given (callers registering encrypted files pass those
        of the plaintext), and reads metadata from `metadata_from` or the first file when it is
        a plaintext GGUF. Raises ConflictError if `ref` exists, InvalidRequestError for files
        outside the model's directory.
        """
        name, tag = parse_ref(ref)
        directory = safe_join(self.model_dir, name, tag)
        if not files:
            raise InvalidRequestError("a model needs at least one file")
        if self.find(ref) is not None:
            raise ConflictError(f"model {format_ref(name, tag)!r} already exists")
        for path in files:
            if path.resolve().parent != directory or not path.is_file():
                raise InvalidRequestError(f"{str(path)!r} is not a file in {str(directory)!r}")
        if sha256 is None:
            sha256 = [file_sha256(path) for path in files]
        if len(sha256) != len(files):
            raise InvalidRequestError("one sha256 per file is needed")
        if size_bytes is None:
            size_bytes = sum(path.stat().st_size for path in files)
        if metadata_from is not None:
            metadata = read_metadata([metadata_from])
        elif encrypted:
            metadata = ModelMetadata()
        else:
            metadata = read_metadata(files)
        now = utcnow()
        row = ModelRow(
            name=name,
            tag=tag,
            source=source,
            files=[path.name for path in files],
            sha256=list(sha256),
            size_bytes=size_bytes,
            architecture=metadata.architecture,
            parameter_count=metadata.parameter_count,
            quantization=metadata.quantization,
            context_length=metadata.context_length,
            chat_template=metadata.chat_template,
            encrypted=encrypted,
            parent=parent,
            created_at=now,
            updated_at=now,
        )
        try:
            with self.database.session() as session:
                session.add(row)
                session.flush()
                return _record(row)
        except IntegrityError:
            raise ConflictError(f"model {format_ref(name, tag)!r} already exists") from None

    def replace_files(
        self,
        ref: str,
        files: builtins.list[str],
        *,
        encrypted: bool,
        sha256: builtins.list[str] | None = None,
    ) -> ModelRecord:
        """After encrypt/decrypt/rotate: new file names and flag; the plaintext SHA-256s stay
        unless given. Raises ModelNotFoundError, InvalidRequestError."""
        name, tag = parse_ref(ref)
        with self.database.session() as session:
            row = _row(session, name, tag)
            if row is None:
                raise ModelNotFoundError(f"model {ref!r} is not registered")
            expected = len(sha256) if sha256 is not None else len(row.files)
            if len(files) != expected:
                raise InvalidRequestError("the new file list does not match the model's files")
            for file in files:
                safe_join(self.model_dir, name, tag, validate_file_name(file))
            row.files = list(files)
            row.encrypted = encrypted
            if sha256 is not None:
                row.sha256 = list(sha256)
            row.updated_at = utcnow()
            session.flush()
            return _record(row)

    def remove(self, ref: str) -> ModelRecord:
        """Delete the row, then the model's directory. Raises ModelNotFoundError."""
        name, tag = parse_ref(ref)
        with self.database.session() as session:
            row = _row(session, name, tag)
            if row is None:
                raise ModelNotFoundError(f"model {ref!r} is not registered")
            record = _record(row)
            session.delete(row)
        directory = record.directory(self.model_dir)
        shutil.rmtree(directory, ignore_errors=True)
        with contextlib.suppress(OSError):  # the name's directory, once its last tag is gone
            directory.parent.rmdir()
        return record

    def change_marker(self) -> tuple[int, datetime | None]:
        """(number of models, newest update): cheap to poll for added/changed/removed models."""
        with self.database.session() as session:
            count, newest = session.execute(
                select(func.count(ModelRow.id), func.max(ModelRow.updated_at))
            ).one()
        return int(count), newest


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_metadata(files: list[Path]) -> ModelMetadata:
    """Architecture, size, quantization, context and template from GGUF headers (the first
    file holds the metadata; parameters are counted over the parts given). Empty for files
    that are not GGUF (safetensors, encrypted).

    Raises InvalidModelFileError for a malformed header.
    """
    if not files or not _starts_with_gguf_magic(files[0]):
        return ModelMetadata()
    headers = [_header(path) for path in files]
    meta = headers[0].metadata
    architecture = _text(meta.get("general.architecture"))
    parameter_count = _integer(meta.get("general.parameter_count"))
    if parameter_count is None:
        parameter_count = sum(header.num_elements for header in headers) or None
    context_length = _integer(meta.get(f"{architecture}.context_length")) if architecture else None
    return ModelMetadata(
        architecture=architecture,
        parameter_count=parameter_count,
        quantization=quantization_name(meta.get("general.file_type")),
        context_length=context_length,
        chat_template=_text(meta.get("tokenizer.chat_template")),
    )


def _starts_with_gguf_magic(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def _header(path: Path) -> GgufHeader:
    with path.open("rb") as f:
        return check_gguf(f, path.stat().st_size, name=path.name)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _integer(value: object) -> int | None:
    return value if type(value) is int else None


def quantization_name(file_type: object) -> str | None:
    """The llama.cpp name of a GGUF `general.file_type` (`Q4_K_M`), None if unknown."""
    import gguf

    if type(file_type) is not int:
        return None
    try:
        name = gguf.LlamaFileType(file_type).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _row(session: Session, name: str, tag: str) -> ModelRow | None:
    return session.scalars(
        select(ModelRow).where(ModelRow.name == name, ModelRow.tag == tag)
    ).one_or_none()


def _record(row: ModelRow) -> ModelRecord:
    return ModelRecord(
        name=row.name,
        tag=row.tag,
        source=row.source,
        files=tuple(row.files),
        sha256=tuple(row.sha256),
        size_bytes=row.size_bytes,
        architecture=row.architecture,
        parameter_count=row.parameter_count,
        quantization=row.quantization,
        context_length=row.context_length,
        chat_template=row.chat_template,
        encrypted=row.encrypted,
        parent=row.parent,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
