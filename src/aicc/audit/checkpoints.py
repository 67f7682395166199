"""Signed checkpoints of the chain head, one JSON line each in `audit-checkpoints.jsonl`.

A checkpoint vouches for the hash of entry `seq`: whoever rewrites the chain before it, or cuts
entries off after it, must also forge an HMAC keyed from the server secret. The file lives
beside the database, not in it, so one stolen database credential is not enough.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aicc.audit.chain import canonical_json, format_time

CHECKPOINTS_FILE_NAME = "audit-checkpoints.jsonl"
CHECKPOINT_KEY_INFO = b"aicc audit checkpoint"

Reason = Literal["periodic", "close", "purge"]
REASONS: frozenset[str] = frozenset(("periodic", "close", "purge"))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    """The entry vouched for."""
    hash: str
    """That entry's hash."""
    count: int
    """Entries in the log when the checkpoint was written (before the delete, for a purge)."""
    time: datetime
    reason: Reason
    """`periodic` (every `audit_checkpoint_every` entries), `close` or `purge` (the cut)."""

    def signed_fields(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "hash": self.hash,
            "count": self.count,
            "time": format_time(self.time),
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class CheckpointLine:
    """One line of the file as read back: the checkpoint, or why it cannot be trusted."""

    line_number: int
    checkpoint: Checkpoint | None
    """None when the line does not parse."""
    is_authentic: bool
    claimed_seq: int | None
    """The `seq` the line claims, even when forged (to name the first bad entry)."""


def checkpoint_key(secret: bytes) -> bytes:
    """HKDF-SHA256 of the server secret: the checkpoint HMAC key (never the secret itself)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=CHECKPOINT_KEY_INFO).derive(
        secret
    )


def sign(key: bytes, checkpoint: Checkpoint) -> str:
    return hmac.new(key, canonical_json(checkpoint.signed_fields()), hashlib.sha256).hexdigest()


class CheckpointFile:
    """Appends signed checkpoints durably and reads them back."""

    def __init__(self, path: Path, secret: bytes) -> None:
        self.path = path
        self._key = checkpoint_key(secret)

    def append(self, checkpoint: Checkpoint) -> None:
        """Append one line and fsync it (and the directory when the file is new).

        Raises OSError when the file cannot be written.
        """
        line = json.dumps({**checkpoint.signed_fields(), "hmac": sign(self._key, checkpoint)})
        is_new = not self.path.exists()
        if is_new:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if is_new:
            _fsync_dir(self.path.parent)

    def read(self) -> list[CheckpointLine]:
        """Every line, authentic or not; an absent file has none.

        Raises OSError when the file exists but cannot be read.
        """
        if not self.path.exists():
            return []
        lines = self.path.read_text(errors="replace").splitlines()
        return [self._parse(number, text) for number, text in enumerate(lines, 1) if text.strip()]

    def latest(self) -> Checkpoint | None:
        """The last authentic checkpoint (the writer resumes its periodic count from it)."""
        for line in reversed(self.read()):
            if line.is_authentic and line.checkpoint is not None:
                return line.checkpoint
        return None

    def _parse(self, number: int, text: str) -> CheckpointLine:
        try:
            data = json.loads(text)
        except ValueError:
            return CheckpointLine(number, None, False, None)
        if not isinstance(data, dict):
            return CheckpointLine(number, None, False, None)
        claimed = data["seq"] if isinstance(data.get("seq"), int) else None
        try:
            reason = data["reason"]
            if reason not in REASONS:
                raise ValueError(reason)
            checkpoint = Checkpoint(
                seq=int(data["seq"]),
                hash=str(data["hash"]),
                count=int(data["count"]),
                time=datetime.fromisoformat(data["time"]).astimezone(UTC),
                reason=reason,
            )
            mac = str(data["hmac"])
        except (ValueError, KeyError, TypeError):
            return CheckpointLine(number, None, False, claimed)
        # Compare the line as signed, not as re-serialised: an edited time must fail too.
        is_authentic = data["time"] == format_time(checkpoint.time) and hmac.compare_digest(
            mac, sign(self._key, checkpoint)
        )
        return CheckpointLine(number, checkpoint, is_authentic, claimed)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
