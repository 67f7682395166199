"""Operations on registered models: encrypt, decrypt, rotate the key, quantize."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from aicc.errors import ConflictError, InvalidRequestError, ModelLoadError
from aicc.store.crypto import (
    ENCRYPTED_SUFFIX,
    decrypt_file,
    encrypt_file,
    file_key_id,
    key_id,
    plaintext_paths,
    rotate_file,
)
from aicc.store.local import BUNDLED_MODEL_NAME, ensure_bundled
from aicc.store.names import format_ref, parse_ref, safe_join, validate_file_name
from aicc.store.registry import ModelRecord, ModelRegistry

QUANT_TYPES = (
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K_S",
    "Q3_K_M",
    "Q3_K_L",
    "Q4_K_S",
    "Q4_K_M",
    "Q5_K_S",
    "Q5_K_M",
    "Q6_K",
    "IQ4_NL",
    "IQ4_XS",
    "F16",
    "BF16",
)
"""Types `quantize` offers: those llama.cpp makes without an importance matrix."""
_SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")


def encrypt_model(registry: ModelRegistry, model_dir: Path, ref: str, key: bytes) -> ModelRecord:
    """Encrypt every file of `ref` (`<file>.aicc-enc` beside it), record the change, then
    delete the plaintext.

    Raises ModelNotFoundError, InvalidRequestError (already encrypted, or a file that no
    longer matches its recorded sha256).
    """
    record = registry.get(ref)
    if record.encrypted:
        raise InvalidRequestError(f"model {record.ref!r} is already encrypted")
    sources = record.paths(model_dir)
    targets = [path.with_name(path.name + ENCRYPTED_SUFFIX) for path in sources]
    try:
        for source, target, expected in zip(sources, targets, record.sha256, strict=True):
            if encrypt_file(source, target, key) != expected:
                raise InvalidRequestError(
                    f"{source.name} no longer matches its recorded sha256; it was changed or "
                    "damaged on disk (remove and pull or import the model again)"
                )
    except BaseException:
        for target in targets:
            target.unlink(missing_ok=True)
        raise
    updated = registry.replace_files(record.ref, [t.name for t in targets], encrypted=True)
    for source in sources:
        source.unlink(missing_ok=True)
    return updated


def decrypt_model(registry: ModelRegistry, model_dir: Path, ref: str, key: bytes) -> ModelRecord:
    """Write the plaintext of every file of `ref`, record the change, delete the encrypted
    files.

    Raises ModelNotFoundError, InvalidRequestError (not encrypted), ModelDecryptionError.
    """
    record = registry.get(ref)
    if not record.encrypted:
        raise InvalidRequestError(f"model {record.ref!r} is not encrypted")
    sources = record.paths(model_dir)
    targets = [_plaintext_name(path) for path in sources]
    try:
        for source, target, expected in zip(sources, targets, record.sha256, strict=True):
            if decrypt_file(source, target, key) != expected:
                raise InvalidRequestError(
                    f"the plaintext of {source.name} does not match its recorded sha256"
                )
    except BaseException:
        for target in targets:
            target.unlink(missing_ok=True)
        raise
    updated = registry.replace_files(record.ref, [t.name for t in targets], encrypted=False)
    for source in sources:
        source.unlink(missing_ok=True)
    return updated


def rotate_model_key(
    registry: ModelRegistry, model_dir: Path, ref: str, old_key: bytes, new_key: bytes
) -> ModelRecord:
    """Re-encrypt every file of `ref` under `new_key`, each crash-safe; files already under
    `new_key` (an interrupted earlier rotation) are skipped.

    Raises ModelNotFoundError, InvalidRequestError (not encrypted), ModelDecryptionError.
    """
    record = registry.get(ref)
    if not record.encrypted:
        raise InvalidRequestError(f"model {record.ref!r} is not encrypted; encrypt it first")
    new_id = key_id(new_key)
    for path in record.paths(model_dir):
        if file_key_id(path) != new_id:
            rotate_file(path, old_key, new_key)
    return registry.replace_files(record.ref, list(record.files), encrypted=True)


def quantize_model(
    registry: ModelRegistry,
    model_dir: Path,
    ref: str,
    qtype: str,
    new_ref: str | None,
    key: bytes | None,
    *,
    encrypt: bool = False,
    threads: int | None = None,
) -> ModelRecord:
    """Quantize `ref` (a registered model, or the bundled one) to `qtype` with llama.cpp and
    register the result as `new_ref` (default `<name>:<qtype>`), parent `ref`.

    An encrypted source is read from memory; the result is encrypted when the source was or
    `encrypt` is set, and then never written to disk in plaintext.

    Raises InvalidRequestError (unknown type, missing key, encrypted multi-part source),
    ConflictError (`new_ref` exists), ModelNotFoundError, ModelLoadError (llama.cpp failed).
    """
    qtype = _check_qtype(qtype)
    sources, parent, source_encrypted = _quantize_source(registry, model_dir, ref)
    target_ref = format_ref(*parse_ref(new_ref or f"{parse_ref(parent)[0]}:{qtype.lower()}"))
    if registry.find(target_ref) is not None:
        raise ConflictError(f"model {target_ref!r} already exists; choose another --name")
    if (source_encrypted or encrypt) and key is None:
        raise InvalidRequestError("a model key is needed to quantize into an encrypted model")
    output_key = key if source_encrypted or encrypt else None
    if source_encrypted and len(sources) > 1:
        raise InvalidRequestError(
            f"{parent!r} is an encrypted multi-part model; decrypt it before quantizing"
        )
    directory = safe_join(model_dir, *parse_ref(target_ref))
    file_name = validate_file_name(f"{_base_name(sources[0])}-{qtype.lower()}.gguf")
    final = directory / (file_name + (ENCRYPTED_SUFFIX if output_key else ""))
    directory.mkdir(parents=True, exist_ok=True)
    source = f"quantize:{parent}"
    try:
        with plaintext_paths(sources[:1], key) as inputs:
            if output_key is not None:
                return _quantize_encrypted(
                    registry, inputs[0], final, qtype, threads, output_key, target_ref, parent
                )
            tmp = directory / f".{file_name}.{os.getpid()}.tmp"
            try:
                quantize_file(inputs[0], tmp, qtype, threads)
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            return registry.register(target_ref, [final], source=source, parent=parent)
    except BaseException:
        if registry.find(target_ref) is None:
            final.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                directory.rmdir()
                directory.parent.rmdir()
        raise


def _quantize_encrypted(
    registry: ModelRegistry,
    source: Path,
    final: Path,
    qtype: str,
    threads: int | None,
    key: bytes,
    target_ref: str,
    parent: str,
) -> ModelRecord:
    """Quantize into a memfd, encrypt that into the model's directory, register."""
    fd = os.memfd_create("aicc-quantized", os.MFD_CLOEXEC)
    try:
        memory_path = Path(f"/proc/self/fd/{fd}")
        quantize_file(source, memory_path, qtype, threads)
        sha256 = encrypt_file(memory_path, final, key)
        with _gguf_alias(memory_path) as alias:
            return registry.register(
                target_ref,
                [final],
                source=f"quantize:{parent}",
                parent=parent,
                metadata_from=alias,
                sha256=[sha256],
                size_bytes=os.fstat(fd).st_size,
                encrypted=True,
            )
    finally:
        os.close(fd)


@contextlib.contextmanager
def _gguf_alias(path: Path) -> Iterator[Path]:
    """A `.gguf`-named symlink to `path` (the registry reads metadata of `.gguf` names only);
    the link holds no model bytes."""
    with tempfile.TemporaryDirectory(prefix="aicc-meta-") as tmp:
        alias = Path(tmp) / "model.gguf"
        alias.symlink_to(path)
        yield alias


def quantize_file(source: Path, target: Path, qtype: str, threads: int | None = None) -> None:
    """Quantize the GGUF `source` (a multi-part model's part 1) into `target`.

    Raises InvalidRequestError for an unknown type, ModelLoadError when llama.cpp fails.
    """
    import llama_cpp

    qtype = _check_qtype(qtype)

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.allow_requantize = True  # sources are usually quantized already
    params.nthread = threads or os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise ModelLoadError(f"llama.cpp could not quantize the model to {qtype}")


def _quantize_source(
    registry: ModelRegistry, model_dir: Path, ref: str
) -> tuple[list[Path], str, bool]:
    """(files, canonical ref, encrypted) of a registered model or the bundled one."""
    record = None if ref == BUNDLED_MODEL_NAME else registry.find(ref)
    if record is None and ref == BUNDLED_MODEL_NAME:
        return [ensure_bundled(model_dir).path], BUNDLED_MODEL_NAME, False
    record = record or registry.get(ref)
    return record.paths(model_dir), record.ref, record.encrypted


def _check_qtype(qtype: str) -> str:
    upper = qtype.strip().upper()
    if upper not in QUANT_TYPES:
        raise InvalidRequestError(
            f"unknown quantization type {qtype!r}; choose one of {', '.join(QUANT_TYPES)}"
        )
    return upper


def _base_name(path: Path) -> str:
    """The file's stem without a split suffix or quantization type: `gemma-3-270m`."""
    stem = path.name.removesuffix(ENCRYPTED_SUFFIX).removesuffix(".gguf")
    stem = _SPLIT_SUFFIX.sub("", stem)
    for qtype in sorted((*QUANT_TYPES, "F32"), key=len, reverse=True):
        for sep in ("-", ".", "_"):
            suffix = f"{sep}{qtype}".lower()
            if stem.lower().endswith(suffix):
                return stem[: -len(suffix)] or "model"
    return stem or "model"


def _plaintext_name(path: Path) -> Path:
    if not path.name.endswith(ENCRYPTED_SUFFIX):
        raise InvalidRequestError(f"{path.name} lacks the {ENCRYPTED_SUFFIX} suffix")
    return path.with_name(path.name.removesuffix(ENCRYPTED_SUFFIX))
