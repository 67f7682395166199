"""Model references and paths: traversal attempts are refused before any file is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from aicc.errors import InvalidRequestError
from aicc.store.names import parse_ref, safe_join, validate_file_name


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("deepseek-r1", ("deepseek-r1", "latest")),
        ("deepseek-r1:7b", ("deepseek-r1", "7b")),
        ("Qwen2.5_x:q4_k_m", ("Qwen2.5_x", "q4_k_m")),
    ],
)
def test_valid_refs(ref: str, expected: tuple[str, str]) -> None:
    assert parse_ref(ref) == expected


@pytest.mark.parametrize(
    "ref",
    ["", "..", "../x", "a/b", "a\\b", "x:..", "x:../y", ".hidden", "a:b:c", "x:", ":tag",
     "a\x00b", "a" * 129, "a b", "-x", "x:a/b", "x..y"],
)  # fmt: skip
def test_invalid_refs_are_refused(ref: str) -> None:
    with pytest.raises(InvalidRequestError):
        parse_ref(ref)


@pytest.mark.parametrize("name", ["../x.gguf", "a/b.gguf", "..", ".x.gguf", "", "x\x00.gguf"])
def test_invalid_file_names(name: str) -> None:
    with pytest.raises(InvalidRequestError):
        validate_file_name(name)


def test_safe_join_stays_inside(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "a", "b") == (tmp_path / "a" / "b").resolve()
    for parts in (("..",), ("a", "..", ".."), ("/etc",), ("a", "/etc/passwd")):
        with pytest.raises(InvalidRequestError):
            safe_join(tmp_path, *parts)
    with pytest.raises(InvalidRequestError):
        safe_join(tmp_path, "a", "..")  # the root itself is not a model's place


def test_safe_join_refuses_a_symlink_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "models"
    root.mkdir()
    (root / "evil").symlink_to(outside)
    with pytest.raises(InvalidRequestError, match="leaves the model directory"):
        safe_join(root, "evil", "latest")
