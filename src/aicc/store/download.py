"""One verified file download: resumable (`.partial` + HTTP Range), in parallel ranged chunks
for large files, SHA-256 checked against the hub's record before anyone uses it."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aicc.store.hub import HubClient, PullError, RemoteFile
from aicc.store.names import validate_file_name

READ_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class DownloadOptions:
    parallel_threshold_bytes: int = 256 << 20
    """Files at least this large are fetched as parallel ranged chunks."""
    chunk_bytes: int = 64 << 20
    """Size of one ranged request (and the unit a chunked download resumes by)."""
    max_connections: int = 4
    """Ranged requests in flight at once."""


@dataclass(frozen=True, slots=True)
class PullProgress:
    file: str
    done_bytes: int
    total_bytes: int
    resumed_bytes: int
    """Already on disk when this run started (not counted in the speed)."""
    elapsed_s: float
    is_verifying: bool = False

    @property
    def bytes_per_s(self) -> float:
        return (self.done_bytes - self.resumed_bytes) / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def eta_s(self) -> float | None:
        speed = self.bytes_per_s
        return (self.total_bytes - self.done_bytes) / speed if speed > 0 else None


ProgressCallback = Callable[[PullProgress], None]


def partial_path(directory: Path, name: str) -> Path:
    return directory / f".{name}.partial"


def download(
    hub: HubClient,
    repo: str,
    revision: str,
    remote: RemoteFile,
    directory: Path,
    *,
    options: DownloadOptions,
    progress: ProgressCallback | None = None,
) -> Path:
    """Fetch `remote` into `directory/.<name>.partial` and verify its size and SHA-256; the
    partial's path. A broken-off download keeps the partial (the next call resumes it); a
    mismatch deletes it. Raises PullError."""
    name = validate_file_name(remote.name)
    if remote.sha256 is None:
        raise PullError(f"{hub.endpoint} lists no sha256 for {remote.path}: it cannot be verified")
    partial = partial_path(directory, name)
    meter = _Meter(name, remote.size, progress)
    if remote.size >= options.parallel_threshold_bytes and options.max_connections > 1:
        try:
            _fetch_chunked(hub, repo, revision, remote, partial, options, meter)
        except _RangesUnsupported:
            _state_path(partial).unlink(missing_ok=True)
            partial.unlink(missing_ok=True)
            meter = _Meter(name, remote.size, progress)
            _fetch_sequential(hub, repo, revision, remote, partial, meter)
    else:
        _state_path(partial).unlink(missing_ok=True)
        _fetch_sequential(hub, repo, revision, remote, partial, meter)
    meter.report(force=True, is_verifying=True)
    size = partial.stat().st_size
    digest = _sha256(partial)
    if size != remote.size or digest != remote.sha256:
        partial.unlink(missing_ok=True)
        _state_path(partial).unlink(missing_ok=True)
        raise PullError(
            f"{remote.path} failed verification (expected sha256 {remote.sha256} and "
            f"{remote.size} bytes, got {digest} and {size}): the download was corrupted and has "
            "been deleted; run the pull again"
        )
    _state_path(partial).unlink(missing_ok=True)
    return partial


class _RangesUnsupported(Exception):
    """The server answered a ranged request with the whole file."""


class _Meter:
    """Counts bytes from several threads; reports at most ten times a second."""

    def __init__(self, name: str, total: int, callback: ProgressCallback | None) -> None:
        self.name = name
        self.total = total
        self.callback = callback
        self.done = 0
        self.resumed = 0
        self.started = time.monotonic()
        self.last_report = 0.0
        self.lock = threading.Lock()

    def resume_from(self, num_bytes: int) -> None:
        self.done = self.resumed = num_bytes

    def add(self, num_bytes: int) -> None:
        with self.lock:
            self.done += num_bytes
        self.report()

    def report(self, *, force: bool = False, is_verifying: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        with self.lock:
            if not force and now - self.last_report < 0.1:
                return
            self.last_report = now
            update = PullProgress(
                self.name, self.done, self.total, self.resumed, now - self.started, is_verifying
            )
        self.callback(update)


def _fetch_sequential(
    hub: HubClient, repo: str, revision: str, remote: RemoteFile, partial: Path, meter: _Meter
) -> None:
    offset = partial.stat().st_size if partial.exists() else 0
    if offset > remote.size:
        partial.unlink()
        offset = 0
    if offset == remote.size:
        return
    with hub.stream(repo, revision, remote.path, start=offset) as response:
        if offset and response.status_code != 206:
            offset = 0  # the server ignored the range: start over
        meter.resume_from(offset)
        with partial.open("r+b" if offset else "wb") as f:
            f.seek(offset)
            for data in response.iter_bytes():
                if f.tell() + len(data) > remote.size:
                    raise PullError(f"{remote.path}: the server sent more than {remote.size} bytes")
                f.write(data)
                meter.add(len(data))


def _state_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".chunks")


def _fetch_chunked(
    hub: HubClient,
    repo: str,
    revision: str,
    remote: RemoteFile,
    partial: Path,
    options: DownloadOptions,
    meter: _Meter,
) -> None:
    chunk = options.chunk_bytes
    num_chunks = -(-remote.size // chunk)
    done = _load_state(partial, remote, chunk)
    if not done:
        partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size != remote.size:
            os.ftruncate(fd, remote.size)
        meter.resume_from(sum(min(chunk, remote.size - i * chunk) for i in done))
        lock = threading.Lock()

        def fetch(index: int) -> None:
            start = index * chunk
            end = min(start + chunk, remote.size) - 1
            with hub.stream(repo, revision, remote.path, start=start, end=end) as response:
                if response.status_code != 206:
                    raise _RangesUnsupported
                position = start
                for data in response.iter_bytes():
                    if position + len(data) > end + 1:
                        raise PullError(f"{remote.path}: a ranged answer ran past its range")
                    os.pwrite(fd, data, position)
                    position += len(data)
                    meter.add(len(data))
            if position != end + 1:
                raise PullError(f"{remote.path}: a ranged answer ended early")
            with lock:
                done.add(index)
                _save_state(partial, remote, chunk, done)

        todo = [i for i in range(num_chunks) if i not in done]
        with ThreadPoolExecutor(options.max_connections, thread_name_prefix="pull") as pool:
            futures = [pool.submit(fetch, index) for index in todo]
            errors = [f.exception() for f in futures]
        os.fsync(fd)
    finally:
        os.close(fd)
    for error in sorted(
        (e for e in errors if e is not None), key=lambda e: not isinstance(e, _RangesUnsupported)
    ):
        raise error


def _load_state(partial: Path, remote: RemoteFile, chunk: int) -> set[int]:
    try:
        state = json.loads(_state_path(partial).read_text())
        if (
            state["size"] == remote.size
            and state["sha256"] == remote.sha256
            and state["chunk_bytes"] == chunk
            and partial.exists()
        ):
            return {int(i) for i in state["done"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return set()


def _save_state(partial: Path, remote: RemoteFile, chunk: int, done: set[int]) -> None:
    state = {
        "size": remote.size,
        "sha256": remote.sha256,
        "chunk_bytes": chunk,
        "done": sorted(done),
    }
    path = _state_path(partial)
    temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(state))
    os.replace(temp, path)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
