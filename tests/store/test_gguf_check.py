"""Our GGUF/safetensors header check: valid files pass, malformed ones are refused with
InvalidModelFileError — never another exception, never a read past the end (fuzzed)."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aicc.store.gguf_check import (
    GgufHeader,
    InvalidModelFileError,
    check_gguf,
    check_model_file,
    check_safetensors,
    refuse_format,
)
from tests.models.tiny_deepseek import write_tiny_deepseek

TENSORS = {"a.weight": (4, 8), "b.weight": (16,), "c.weight": (2, 2, 8)}


def write_small_gguf(path: Path) -> bytes:
    """A few KB: scalar, string and array metadata, three F32 tensors."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("small")
    writer.add_context_length(128)
    writer.add_token_list(["a", "bb", "ccc"])
    writer.add_array("small.ints", [1, 2, 3])
    writer.add_float32("small.f", 0.5)
    for index, (name, shape) in enumerate(TENSORS.items()):
        writer.add_tensor(name, np.full(shape, index, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")


def check_bytes(data: bytes) -> GgufHeader:
    return check_gguf(io.BytesIO(data), len(data), name="test.gguf")


def tensor_offset_position(data: bytes, name: str) -> int:
    """Byte position of the `offset` field of tensor `name`'s info."""
    at = data.index(name.encode()) + len(name)
    num_dims: int = struct.unpack_from("<I", data, at)[0]
    return at + 4 + 8 * num_dims + 4


def test_a_valid_file_passes_with_its_metadata(small: bytes, tmp_path: Path) -> None:
    header = check_bytes(small)
    assert header.version == 3
    assert [t.name for t in header.tensors] == list(TENSORS)
    assert header.metadata["general.architecture"] == "llama"
    assert header.metadata["llama.context_length"] == 128
    tiny = write_tiny_deepseek(tmp_path / "tiny.gguf")
    full = check_model_file(tiny)
    assert full is not None
    assert len(full.tensors) == 52
    assert full.metadata["general.architecture"] == "deepseek2"


@pytest.mark.parametrize("cut", [0, 3, 7, 20, 100, -1, -17])
def test_truncated_files_are_refused(small: bytes, cut: int) -> None:
    message = r"truncated|past the end|ends before|impossible"
    with pytest.raises(InvalidModelFileError, match=message):
        check_bytes(small[:cut])


def test_a_tensor_offset_past_the_end_is_refused(small: bytes) -> None:
    data = bytearray(small)
    at = tensor_offset_position(small, "c.weight")
    struct.pack_into("<Q", data, at, len(small))  # aligned, but the data would lie beyond EOF
    with pytest.raises(InvalidModelFileError, match="past the end of the file"):
        check_bytes(bytes(data))
    struct.pack_into("<Q", data, at, 2**64 - 32)
    with pytest.raises(InvalidModelFileError, match="past the end"):
        check_bytes(bytes(data))


def test_overlapping_and_misaligned_tensors_are_refused(small: bytes) -> None:
    data = bytearray(small)
    struct.pack_into("<Q", data, tensor_offset_position(small, "b.weight"), 0)
    with pytest.raises(InvalidModelFileError, match="overlaps"):
        check_bytes(bytes(data))
    struct.pack_into("<Q", data, tensor_offset_position(small, "b.weight"), 3)
    with pytest.raises(InvalidModelFileError, match="not aligned"):
        check_bytes(bytes(data))


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ((0, b"GGML"), "bad magic"),
        ((4, struct.pack("<I", 1)), "version 1"),
        ((4, struct.pack(">I", 3)), "unsupported GGUF version"),
        ((8, struct.pack("<Q", 2**40)), "tensor count"),
        ((16, struct.pack("<Q", 2**62)), "metadata count"),
        ((24, struct.pack("<Q", 2**63)), "invalid length"),
    ],
)
def test_malformed_fields_are_named(small: bytes, patch: tuple[int, bytes], message: str) -> None:
    at, value = patch
    data = small[:at] + value + small[at + len(value) :]
    with pytest.raises(InvalidModelFileError, match=message):
        check_bytes(data)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_pickle_formats_are_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04\x95")
    with pytest.raises(InvalidModelFileError, match="pickle"):
        check_model_file(path)
    with pytest.raises(InvalidModelFileError, match="pickle"):
        refuse_format(path)


def test_other_formats_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFileError, match=r"only \.gguf and \.safetensors"):
        refuse_format(tmp_path / "model.onnx")
    renamed = tmp_path / "model.gguf"
    renamed.write_bytes(b"PK\x03\x04" + bytes(100))  # a zip (torch.save) renamed to .gguf
    with pytest.raises(InvalidModelFileError, match="bad magic"):
        check_model_file(renamed)


def safetensors_bytes(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_safetensors_headers_are_checked(tmp_path: Path) -> None:
    good = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [2], "data_offsets": [16, 20]},
    }
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(good, bytes(20)))
    assert check_model_file(path) is None
    bad_cases: list[tuple[bytes, str]] = [
        (safetensors_bytes(good, bytes(19)), "past the end"),
        (struct.pack("<Q", 2**40) + b"{}", "header length"),
        (struct.pack("<Q", 5) + b"{nope", "not valid JSON"),
        (safetensors_bytes({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}},
                           bytes(16)), "shape needs 12"),
        (safetensors_bytes({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}},
                           bytes(1)), "unknown dtype"),
        (safetensors_bytes({"w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 0]}},
                           bytes(1)), "invalid data_offsets"),
        (safetensors_bytes({"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                            "v": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}},
                           bytes(3)), "overlaps"),
        (b"\x01\x00", "truncated"),
    ]  # fmt: skip
    for data, message in bad_cases:
        with pytest.raises(InvalidModelFileError, match=message):
            check_safetensors(io.BytesIO(data), len(data))


def accepted_is_consistent(data: bytes, tmp_path: Path) -> None:
    """What our check accepts, gguf's own reader parses, and every tensor lies in the file."""
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(data)
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == len(check_bytes(data).tensors)
    for tensor in reader.tensors:
        assert tensor.data_offset + tensor.n_bytes <= len(data)


@settings(
    max_examples=200,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    mutations=st.lists(
        st.tuples(st.integers(min_value=0, max_value=2**16), st.integers(0, 255)),
        min_size=1,
        max_size=6,
    ),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=2**16)),
)
def test_fuzzed_headers_are_accepted_only_when_consistent(
    small: bytes, tmp_path: Path, mutations: list[tuple[int, int]], cut: int | None
) -> None:
    header_size = check_bytes(small).data_offset
    data = bytearray(small)
    for position, value in mutations:
        data[position % header_size] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    try:
        check_bytes(bytes(data))
    except InvalidModelFileError:
        return
    accepted_is_consistent(bytes(data), tmp_path)
