"""Our own bounded check of GGUF and safetensors headers, run before llama.cpp sees a file.

Reads only the header through a file object (never the whole file); every count, length and
offset is checked against what is left of the file before anything is read or allocated.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

from aicc.errors import AiccError

MetadataValue = str | int | float | bool

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_KEY_BYTES = 1 << 16
MAX_DIMS = 4
MAX_TENSOR_NAME_BYTES = 63
"""ggml keeps names in 64 bytes including the terminating NUL."""
MAX_SAFETENSORS_HEADER = 100 << 20
MAX_KEPT_STRING_BYTES = 1 << 20
"""String values up to this size are kept in `GgufHeader.metadata` (chat templates fit)."""

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
ACCEPTED_SUFFIXES = frozenset({".gguf", ".safetensors"})

_STRING = 8
_ARRAY = 9
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""GGUF value type -> byte size, for the fixed-size types."""
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}  # fmt: skip

# ggml type -> (elements per block, bytes per block); ids as in ggml.h.
_GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 40), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
    14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98),
    19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1),
    25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54),
    35: (256, 66), 39: (32, 17),
}  # fmt: skip

_SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I16": 16,
    "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64,
    "F64": 64,
}  # fmt: skip


class InvalidModelFileError(AiccError):
    """A model file is malformed, truncated, or of a refused format."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_model_file"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    """From the start of the data section."""
    num_bytes: int


@dataclass(frozen=True, slots=True)
class GgufHeader:
    version: int
    num_kv: int
    alignment: int
    data_offset: int
    """Where the tensor data starts in the file."""
    file_size: int
    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, MetadataValue]
    """Scalar and string values (strings up to 1 MiB); arrays are checked but not kept."""

    @property
    def num_elements(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)


def refuse_format(path: Path) -> None:
    """Refuse pickle-based formats (they can run code when loaded) and anything not GGUF or
    safetensors, by file name. Raises InvalidModelFileError."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise InvalidModelFileError(
            f"{path.name}: {suffix} is a pickle-based format, which can run code when loaded; "
            "only GGUF and safetensors are accepted (convert it with llama.cpp's "
            "convert_hf_to_gguf.py)"
        )
    if suffix not in ACCEPTED_SUFFIXES:
        raise InvalidModelFileError(
            f"{path.name}: unknown model format {suffix or '(no suffix)'!r}; "
            "only .gguf and .safetensors files are accepted"
        )


def check_model_file(path: Path, *, name: str | None = None) -> GgufHeader | None:
    """Check a GGUF or safetensors file; the GGUF header, or None for safetensors. The format
    comes from `name` (default: the path's name), so temp files can be checked before rename.

    Raises InvalidModelFileError.
    """
    name = name or path.name
    refuse_format(Path(name))
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if name.lower().endswith(".safetensors"):
                check_safetensors(f, size, name=name)
                return None
            return check_gguf(f, size, name=name)
    except OSError as exc:
        raise InvalidModelFileError(f"{name}: cannot read: {exc.strerror}") from None


def check_gguf(f: BinaryIO, size: int, *, name: str = "file") -> GgufHeader:
    """Validate a GGUF header read from `f` (a file of `size` bytes, read from its start).

    Raises InvalidModelFileError saying what is wrong.
    """
    reader = _Reader(f, size, name)
    if reader.read(4, "magic") != GGUF_MAGIC:
        raise reader.error("not a GGUF file (bad magic)")
    version = reader.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise reader.error(f"unsupported GGUF version {version} (big-endian or too old/new)")
    num_tensors = reader.u64("tensor count")
    num_kv = reader.u64("metadata count")
    if num_tensors > MAX_TENSORS or num_tensors * 32 > reader.remaining:
        raise reader.error(f"tensor count {num_tensors} is impossible for the file size")
    if num_kv > MAX_KV or num_kv * 13 > reader.remaining:
        raise reader.error(f"metadata count {num_kv} is impossible for the file size")
    alignment = DEFAULT_ALIGNMENT
    metadata: dict[str, MetadataValue] = {}
    seen_keys: set[str] = set()
    for _ in range(num_kv):
        key = reader.text(MAX_KEY_BYTES, "metadata key")
        if key in seen_keys:
            raise reader.error(f"duplicate metadata key {key!r}")
        seen_keys.add(key)
        value = _read_value(reader, reader.u32(f"type of {key!r}"), key)
        if value is not None:
            metadata[key] = value
    if "general.alignment" in metadata:
        alignment_value = metadata["general.alignment"]
        if type(alignment_value) is not int or not _is_power_of_two(alignment_value):
            raise reader.error(f"general.alignment {alignment_value!r} is not a power of two")
        alignment = alignment_value
    tensors = [_tensor_info(reader, alignment) for _ in range(num_tensors)]
    if len({t.name for t in tensors}) != len(tensors):
        raise reader.error("duplicate tensor names")
    data_offset = -(-reader.position // alignment) * alignment
    if tensors and data_offset > size:
        raise reader.error("the file ends before its tensor data")
    end = 0
    for tensor in sorted(tensors, key=lambda t: t.offset):
        if tensor.offset < end:
            raise reader.error(f"tensor {tensor.name!r} overlaps the previous tensor")
        end = tensor.offset + tensor.num_bytes
        if data_offset + end > size:
            raise reader.error(
                f"tensor {tensor.name!r} ends at byte {data_offset + end}, past the end of the "
                f"file ({size} bytes): truncated or corrupt"
            )
    return GgufHeader(
        version, num_kv, alignment, data_offset, size, tuple(tensors), MappingProxyType(metadata)
    )


def check_safetensors(f: BinaryIO, size: int, *, name: str = "file") -> int:
    """Validate a safetensors header (length, JSON, dtypes, shapes, offsets); the number of
    tensors. Raises InvalidModelFileError."""
    reader = _Reader(f, size, name)
    header_len = reader.u64("header length")
    if header_len > MAX_SAFETENSORS_HEADER or header_len > reader.remaining:
        raise reader.error(f"safetensors header length {header_len} is impossible")
    raw = reader.read(header_len, "safetensors header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise reader.error("the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise reader.error("the safetensors header is not a JSON object")
    data_len = size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise reader.error("__metadata__ must map strings to strings")
            continue
        spans.append(_safetensors_span(reader, key, entry, data_len))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin < end:
            raise reader.error(f"tensor {key!r} overlaps another tensor")
        end = stop
    return len(spans)


def _safetensors_span(
    reader: _Reader, key: str, entry: object, data_len: int
) -> tuple[int, int, str]:
    if not isinstance(entry, dict):
        raise reader.error(f"tensor {key!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _SAFETENSORS_DTYPE_BITS:
        raise reader.error(f"tensor {key!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise reader.error(f"tensor {key!r} has an invalid shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise reader.error(f"tensor {key!r} has invalid data_offsets")
    begin, stop = offsets
    if stop > data_len:
        raise reader.error(f"tensor {key!r} ends past the end of the file: truncated or corrupt")
    expected = math.prod(shape) * _SAFETENSORS_DTYPE_BITS[str(dtype)] // 8
    if stop - begin != expected:
        raise reader.error(f"tensor {key!r} holds {stop - begin} bytes, its shape needs {expected}")
    return begin, stop, key


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value < 1 << 63


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0 and value < 1 << 32


def _read_value(reader: _Reader, value_type: int, key: str) -> MetadataValue | None:
    """The value if kept (scalars, short strings); None once skipped (arrays, long strings)."""
    if value_type in _SCALAR_FORMATS:
        raw = reader.read(_SCALAR_SIZES[value_type], key)
        value: MetadataValue = struct.unpack(_SCALAR_FORMATS[value_type], raw)[0]
        return value
    if value_type == _STRING:
        length = reader.u64(f"length of {key!r}")
        if length > MAX_KEPT_STRING_BYTES:
            reader.skip(length, key)
            return None
        return reader.read(length, key).decode("utf-8", errors="replace")
    if value_type == _ARRAY:
        item_type = reader.u32(f"item type of {key!r}")
        count = reader.u64(f"length of {key!r}")
        if item_type in _SCALAR_SIZES:
            reader.skip(count * _SCALAR_SIZES[item_type], key)
        elif item_type == _STRING:
            if count * 8 > reader.remaining:
                raise reader.error(f"array {key!r} is longer than the file")
            for _ in range(count):
                reader.skip(reader.u64(f"string length in {key!r}"), key)
        else:
            raise reader.error(f"array {key!r} has an invalid item type {item_type}")
        return None
    raise reader.error(f"metadata {key!r} has an invalid value type {value_type}")


def _tensor_info(reader: _Reader, alignment: int) -> TensorInfo:
    name = reader.text(MAX_TENSOR_NAME_BYTES, "tensor name")
    num_dims = reader.u32(f"dimension count of {name!r}")
    if not 1 <= num_dims <= MAX_DIMS:
        raise reader.error(f"tensor {name!r} has {num_dims} dimensions (1-{MAX_DIMS} allowed)")
    shape = tuple(reader.u64(f"shape of {name!r}") for _ in range(num_dims))
    if any(d == 0 or d >= 1 << 63 for d in shape) or math.prod(shape) >= 1 << 63:
        raise reader.error(f"tensor {name!r} has an invalid shape {shape}")
    ggml_type = reader.u32(f"type of {name!r}")
    if ggml_type not in _GGML_BLOCKS:
        raise reader.error(f"tensor {name!r} has an unknown type {ggml_type}")
    block_size, block_bytes = _GGML_BLOCKS[ggml_type]
    if shape[0] % block_size:
        raise reader.error(f"tensor {name!r}: row size {shape[0]} is not a multiple of its block")
    offset = reader.u64(f"offset of {name!r}")
    if offset % alignment:
        raise reader.error(f"tensor {name!r} offset {offset} is not aligned to {alignment}")
    num_bytes = math.prod(shape) // block_size * block_bytes
    return TensorInfo(name, shape, ggml_type, offset, num_bytes)


class _Reader:
    """Reads at most what is left of the file; every read is bounded first."""

    def __init__(self, f: BinaryIO, size: int, name: str) -> None:
        self._f = f
        self.size = size
        self.position = 0
        self.name = name

    @property
    def remaining(self) -> int:
        return self.size - self.position

    def error(self, message: str) -> InvalidModelFileError:
        return InvalidModelFileError(f"{self.name}: {message}")

    def read(self, num_bytes: int, what: str) -> bytes:
        if num_bytes > self.remaining:
            raise self.error(f"truncated: the file ends inside the {what}")
        data = self._f.read(num_bytes)
        if len(data) != num_bytes:
            raise self.error(f"truncated: the file ends inside the {what}")
        self.position += num_bytes
        return data

    def skip(self, num_bytes: int, what: str) -> None:
        if num_bytes > self.remaining:
            raise self.error(f"truncated: {what!r} runs past the end of the file")
        self._f.seek(num_bytes, 1)
        self.position += num_bytes

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.read(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = struct.unpack("<Q", self.read(8, what))[0]
        return value

    def text(self, max_bytes: int, what: str) -> str:
        length = self.u64(f"length of {what}")
        if length == 0 or length > max_bytes:
            raise self.error(f"{what} has an invalid length {length}")
        try:
            return self.read(length, what).decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not valid UTF-8") from None
