"""`aicc models pull`: a catalog alias or `hf:REPO[@REV][:FILE]` -> verified files in the model
directory -> a registry entry."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aicc.errors import ConflictError, InvalidRequestError
from aicc.store.catalog import DEFAULT_QUANT, CatalogEntry, find_entry, memory_warning
from aicc.store.download import DownloadOptions, ProgressCallback, download
from aicc.store.gguf_check import check_model_file, refuse_format
from aicc.store.hub import HubClient, PullError, RemoteFile, validate_repo, validate_revision
from aicc.store.names import format_ref, parse_ref, safe_join
from aicc.store.registry import ModelRecord, ModelRegistry

HF_PREFIX = "hf:"
_PART = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True, slots=True)
class PullPlan:
    repo: str
    revision: str
    files: tuple[RemoteFile, ...]
    """In load order: a multi-part GGUF's part 1 first."""
    default_ref: str
    entry: CatalogEntry | None
    quant: str

    @property
    def source(self) -> str:
        return f"hf:{self.repo}@{self.revision}"

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


def plan_pull(hub: HubClient, spec: str, *, quant: str = DEFAULT_QUANT) -> PullPlan:
    """Resolve what to download: the catalog entry's files, or a repository's file(s).

    Raises InvalidRequestError (unknown alias, ambiguous choice), ModelNotFoundError, PullError.
    """
    if spec.startswith(HF_PREFIX):
        repo, revision, file = _parse_hf_spec(spec)
        files = hub.list_files(repo, revision)
        chosen = _pick_file(files, file, spec) if file else _pick_quant(files, quant, spec)
        name = re.sub(r"[^a-z0-9._-]", "-", repo.split("/")[1].lower().removesuffix("-gguf"))
        tag = "latest" if file else quant.lower()
        return PullPlan(
            repo, revision, chosen, format_ref(name.strip("-._") or "model", tag), None, quant
        )
    entry = find_entry(spec)
    if entry is None:
        raise InvalidRequestError(
            f"{spec!r} is not in the catalog (`aicc models catalog` lists it); "
            "pull any GGUF repository with hf:OWNER/REPO[:FILE]"
        )
    entry.file_stem(quant)  # refuses a quantization the entry does not list
    files = hub.list_files(entry.repo, "main")
    matches = [f for f in files if entry.matches(f.path, quant)]
    if not matches:
        raise PullError(f"{entry.repo} holds no {quant} file named {entry.file_stem(quant)}*.gguf")
    chosen = _complete_set(files, matches[0], entry.repo)
    alias = entry.alias if ":" in entry.alias else f"{entry.alias}:latest"
    return PullPlan(entry.repo, "main", chosen, alias, entry, quant)


def pull_model(
    registry: ModelRegistry,
    hub: HubClient,
    plan: PullPlan,
    *,
    ref: str | None = None,
    options: DownloadOptions | None = None,
    encrypt_key: bytes | None = None,
    progress: ProgressCallback | None = None,
    warn: Callable[[str], None] | None = None,
) -> ModelRecord:
    """Download, verify, check and register `plan` as `ref` (default: the plan's).

    A failed download keeps its `.partial` for the next pull to resume. Raises ConflictError
    (ref exists), PullError, InvalidModelFileError, ModelNotFoundError.
    """
    ref = ref or plan.default_ref
    name, tag = parse_ref(ref)
    ref = format_ref(name, tag)
    if registry.find(ref) is not None:
        raise ConflictError(f"model {ref!r} already exists; `aicc models rm {ref}` first")
    if warn is not None and plan.entry is not None:
        message = memory_warning(plan.entry, plan.quant)
        if message:
            warn(message)
    directory = safe_join(registry.model_dir, name, tag)
    directory.mkdir(parents=True, exist_ok=True)
    partials = [
        download(
            hub, plan.repo, plan.revision, remote, directory,
            options=options or DownloadOptions(), progress=progress,
        )
        for remote in plan.files
    ]  # fmt: skip
    try:
        for remote, partial in zip(plan.files, partials, strict=True):
            check_model_file(partial, name=remote.name)
    except BaseException:
        for partial in partials:  # verified against the hub, yet malformed: no use resuming
            partial.unlink(missing_ok=True)
        raise
    sha256 = [remote.sha256 or "" for remote in plan.files]
    return _place_and_register(
        registry, ref, directory, plan, partials, sha256, encrypt_key=encrypt_key
    )


def _place_and_register(
    registry: ModelRegistry,
    ref: str,
    directory: Path,
    plan: PullPlan,
    partials: list[Path],
    sha256: list[str],
    *,
    encrypt_key: bytes | None,
) -> ModelRecord:
    placed: list[Path] = []
    try:
        if encrypt_key is not None:
            from aicc.store.crypto import ENCRYPTED_SUFFIX, encrypt_file

            for remote, partial in zip(plan.files, partials, strict=True):
                target = directory / (remote.name + ENCRYPTED_SUFFIX)
                encrypt_file(partial, target, encrypt_key)
                placed.append(target)
            record = registry.register(
                ref, placed, source=plan.source, metadata_from=partials[0], sha256=sha256,
                size_bytes=plan.size_bytes, encrypted=True,
            )  # fmt: skip
            for partial in partials:
                partial.unlink()
            return record
        for remote, partial in zip(plan.files, partials, strict=True):
            target = directory / remote.name
            os.replace(partial, target)
            placed.append(target)
        return registry.register(ref, placed, source=plan.source, sha256=sha256)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        raise


def _parse_hf_spec(spec: str) -> tuple[str, str, str | None]:
    """`hf:OWNER/REPO[@REV][:FILE]` -> (repo, revision, file)."""
    body = spec.removeprefix(HF_PREFIX)
    target, _, file = body.partition(":")
    repo, _, revision = target.partition("@")
    if file and (file.startswith("/") or ".." in file.split("/") or "\\" in file):
        raise InvalidRequestError(f"invalid file {file!r} in {spec!r}")
    return validate_repo(repo), validate_revision(revision or "main"), file or None


def _pick_file(files: list[RemoteFile], path: str, spec: str) -> tuple[RemoteFile, ...]:
    for remote in files:
        if remote.path == path:
            refuse_format(Path(remote.name))
            return _complete_set(files, remote, spec)
    raise InvalidRequestError(f"{spec!r}: the repository has no file {path!r}")


def _pick_quant(files: list[RemoteFile], quant: str, spec: str) -> tuple[RemoteFile, ...]:
    wanted = quant.lower()
    candidates = [
        f for f in files if f.path.endswith(".gguf") and wanted in f.name.lower()
        and "mmproj" not in f.name.lower()
    ]  # fmt: skip
    groups: dict[str, RemoteFile] = {}
    for remote in candidates:
        match = _PART.match(remote.path)
        key = match.group("stem") if match else remote.path
        if match is None or match.group("index") == "00001":
            groups[key] = remote
    if len(groups) != 1:
        listed = ", ".join(sorted(groups)[:10]) or "none"
        raise InvalidRequestError(
            f"{spec!r}: {len(groups)} {quant} GGUF files match ({listed}); name one with "
            "hf:OWNER/REPO:FILE or pick another --quant"
        )
    return _complete_set(files, next(iter(groups.values())), spec)


def _complete_set(files: list[RemoteFile], first: RemoteFile, what: str) -> tuple[RemoteFile, ...]:
    """`first` alone, or every part of the multi-part GGUF it belongs to, part 1 first."""
    match = _PART.match(first.path)
    if match is None:
        return (first,)
    stem, count = match.group("stem"), match.group("count")
    by_path = {f.path: f for f in files}
    parts = []
    for index in range(1, int(count) + 1):
        path = f"{stem}-{index:05d}-of-{count}.gguf"
        if path not in by_path:
            raise PullError(f"{what}: part {path} of the multi-part model is missing")
        parts.append(by_path[path])
    return tuple(parts)
