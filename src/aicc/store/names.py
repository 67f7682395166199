"""Model references (`name[:tag]`), file names, and joins that cannot leave the model dir."""

from __future__ import annotations

import re
from pathlib import Path

from aicc.errors import InvalidRequestError

DEFAULT_TAG = "latest"
MAX_REF_LENGTH = 257

_PART_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FILE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")


def validate_part(value: str, what: str) -> str:
    """A model name or tag: letters, digits, `.`, `_`, `-`; no separators, no `..`.

    Raises InvalidRequestError naming the value.
    """
    if not _PART_PATTERN.fullmatch(value) or ".." in value:
        raise InvalidRequestError(
            f"invalid model {what} {value!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', '\\' or '..')"
        )
    return value


def parse_ref(ref: str) -> tuple[str, str]:
    """`name[:tag]` -> (name, tag); the tag defaults to `latest`.

    Raises InvalidRequestError for anything else (separators, `..`, empty parts, NUL).
    """
    if not isinstance(ref, str) or not ref or len(ref) > MAX_REF_LENGTH:
        raise InvalidRequestError(f"invalid model reference {ref!r}: expected name[:tag]")
    name, sep, tag = ref.partition(":")
    if sep and not tag:
        raise InvalidRequestError(f"invalid model reference {ref!r}: the tag after ':' is empty")
    return validate_part(name, "name"), validate_part(tag or DEFAULT_TAG, "tag")


def format_ref(name: str, tag: str) -> str:
    return f"{name}:{tag}"


def validate_file_name(value: str) -> str:
    """A single file name (no directory part), safe to create in a model's directory.

    Raises InvalidRequestError.
    """
    if not _FILE_PATTERN.fullmatch(value) or ".." in value:
        raise InvalidRequestError(f"invalid model file name {value!r}")
    return value


def safe_join(root: Path, *parts: str) -> Path:
    """`root/parts...`, resolved, refused unless it stays inside `root`.

    Raises InvalidRequestError for a path that escapes (`..`, absolute parts, symlinks out).
    """
    base = root.resolve()
    for part in parts:
        if not part or "\x00" in part or Path(part).is_absolute():
            raise InvalidRequestError(f"unsafe path component {part!r}")
    target = base.joinpath(*parts).resolve()
    if target == base or not target.is_relative_to(base):
        raise InvalidRequestError(f"path {'/'.join(parts)!r} leaves the model directory")
    return target
