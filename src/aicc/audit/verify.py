"""`verify`: walk the chain and the signed checkpoints, and name the first entry that fails.

What each kind of tampering looks like here:
- an edited entry: its recomputed hash differs from the stored one (or, if the editor also
  rewrote the hashes after it, the next checkpoint no longer matches);
- a deleted entry: a gap in seq, or a first entry with no purge checkpoint right before it;
- an inserted entry: the next entry links past it, to the one before it;
- a truncated log: a checkpoint vouches for a seq beyond the last entry, or no longer matches;
- a forged or edited checkpoint: its HMAC does not verify under the server secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from sqlalchemy import Table, select

from aicc.audit.chain import GENESIS_HASH
from aicc.audit.checkpoints import Checkpoint, CheckpointFile
from aicc.audit.entries import AuditEntry
from aicc.db import Database
from aicc.db.models import AuditEntryRow

_LOG = cast(Table, AuditEntryRow.__table__)
_READ_BATCH = 1000


@dataclass(frozen=True, slots=True)
class VerifyReport:
    ok: bool
    num_checked: int
    """Entries whose hash and link were checked before the first problem."""
    first_bad_seq: int | None
    """The first entry that is missing, altered or not vouched for (None when ok, or when
    only an unreadable checkpoint line names no seq)."""
    problem: str | None


@dataclass(slots=True)
class _Walk:
    """State of the walk along the chain, one entry at a time."""

    checkpoints: dict[int, list[Checkpoint]]
    purge_cuts: dict[int, Checkpoint]
    last_seq: int | None = None
    last_hash: str = GENESIS_HASH
    before_last_hash: str | None = None
    vouched_seq: int = 0
    """The newest seq a checkpoint (or the chain's start) vouches for."""
    num_checked: int = 0
    problems: list[tuple[int | None, str]] = field(default_factory=list)

    def start(self, entry: AuditEntry) -> bool:
        if entry.seq == 1:
            expected = GENESIS_HASH
        elif (cut := self.purge_cuts.get(entry.seq - 1)) is not None:
            expected = cut.hash
        else:
            earlier = [seq for seq in self.purge_cuts if seq < entry.seq - 1]
            missing = max(earlier, default=0) + 1
            return self._fail(
                missing,
                f"entries {missing}..{entry.seq - 1} are missing: the log starts at seq "
                f"{entry.seq} with no purge checkpoint at seq {entry.seq - 1}",
            )
        self.vouched_seq = entry.seq - 1
        if entry.prev_hash != expected:
            return self._fail(entry.seq, f"entry {entry.seq} does not link to its predecessor")
        return self._check(entry)

    def step(self, entry: AuditEntry) -> bool:
        assert self.last_seq is not None  # `start` ran first
        if entry.seq != self.last_seq + 1:
            missing = self.last_seq + 1
            return self._fail(missing, f"entries {missing}..{entry.seq - 1} are missing (deleted)")
        if entry.prev_hash != self.last_hash:
            if entry.prev_hash == self.before_last_hash:
                return self._fail(
                    self.last_seq,
                    f"entry {self.last_seq} was inserted: entry {entry.seq} links past it",
                )
            return self._fail(
                entry.seq,
                f"entry {entry.seq} does not link to entry {self.last_seq} "
                "(an entry before it was edited, deleted or inserted)",
            )
        return self._check(entry)

    def _check(self, entry: AuditEntry) -> bool:
        if entry.compute_hash() != entry.hash:
            return self._fail(entry.seq, f"entry {entry.seq} was edited (its hash does not match)")
        for checkpoint in self.checkpoints.get(entry.seq, ()):
            if checkpoint.hash != entry.hash:
                first = self.vouched_seq + 1
                return self._fail(
                    first,
                    f"entry {entry.seq} differs from the signed checkpoint at seq {entry.seq}: "
                    f"entries {first}..{entry.seq} were rewritten, or the log was truncated and "
                    "written again",
                )
            self.vouched_seq = entry.seq
        self.before_last_hash, self.last_hash = self.last_hash, entry.hash
        self.last_seq = entry.seq
        self.num_checked += 1
        return True

    def _fail(self, seq: int | None, problem: str) -> bool:
        self.problems.append((seq, problem))
        return False

    def finish(self) -> None:
        """After the last entry: a checkpoint beyond it means the tail was cut off."""
        last = self.last_seq
        if last is None:  # no entries at all; a purge always leaves its own entry
            last = 0
        beyond = [seq for seq in self.checkpoints if seq > last]
        if beyond:
            self._fail(
                last + 1,
                f"the log ends at seq {last} but a signed checkpoint vouches for seq "
                f"{max(beyond)}: entries {last + 1}..{max(beyond)} were removed",
            )


def verify(db: Database, checkpoints_path: Path, secret: bytes) -> VerifyReport:
    """Check the whole chain against itself and the checkpoint file.

    Raises OSError when the checkpoint file exists but cannot be read, and the database's
    error when the log cannot be read.
    """
    # The file before the table: every checkpoint read then covers a committed entry.
    lines = CheckpointFile(checkpoints_path, secret).read()
    problems: list[tuple[int | None, str]] = []
    checkpoints: dict[int, list[Checkpoint]] = {}
    purge_cuts: dict[int, Checkpoint] = {}
    for line in lines:
        if not line.is_authentic or line.checkpoint is None:
            problems.append(
                (
                    line.claimed_seq,
                    f"checkpoint line {line.line_number} of {checkpoints_path} is not signed "
                    "by this server's secret (forged or edited)",
                )
            )
            continue
        checkpoints.setdefault(line.checkpoint.seq, []).append(line.checkpoint)
        if line.checkpoint.reason == "purge":
            purge_cuts[line.checkpoint.seq] = line.checkpoint
    walk = _Walk(checkpoints, purge_cuts)
    is_intact = True
    with db.engine.connect() as conn:
        # One statement, streamed: one consistent snapshot even while the writer appends.
        rows = conn.execution_options(stream_results=True, yield_per=_READ_BATCH).execute(
            select(_LOG).order_by(_LOG.c.seq)
        )
        try:
            for row in rows.mappings():
                entry = AuditEntry.from_row(row)
                is_intact = walk.step(entry) if walk.last_seq is not None else walk.start(entry)
                if not is_intact:
                    break
        finally:
            rows.close()  # a server-side cursor left half-read must be closed, not collected
    if is_intact:
        walk.finish()
    problems.extend(walk.problems)
    if not problems:
        return VerifyReport(True, walk.num_checked, None, None)
    seq, problem = min(problems, key=lambda p: (p[0] is None, p[0] or 0))
    return VerifyReport(False, walk.num_checked, seq, problem)
