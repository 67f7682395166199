"""A client for Hugging Face-compatible endpoints: a repository's file list (with the SHA-256
and size the hub records for each LFS file) and file downloads, ranged when asked."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from aicc.errors import AiccError, InvalidRequestError, ModelNotFoundError

MAX_TREE_PAGES = 100
TOKEN_ENV = "HF_TOKEN"

_REPO_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class PullError(AiccError):
    """A download failed or did not verify."""

    status_code = 502
    error_type = "server_error"
    code = "pull_failed"


@dataclass(frozen=True, slots=True)
class RemoteFile:
    path: str
    """Inside the repository, may include folders."""
    size: int
    sha256: str | None
    """From the hub's LFS metadata; None for files kept in git itself."""

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def validate_repo(repo: str) -> str:
    if not _REPO_PATTERN.fullmatch(repo) or ".." in repo:
        raise InvalidRequestError(f"invalid repository {repo!r}: expected owner/name")
    return repo


def validate_revision(revision: str) -> str:
    if not _REVISION_PATTERN.fullmatch(revision) or ".." in revision:
        raise InvalidRequestError(f"invalid revision {revision!r}")
    return revision


class HubClient:
    """Synchronous; one connection pool, safe to share between download threads."""

    def __init__(
        self,
        endpoint: str,
        *,
        token: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        if not re.match(r"^https?://", endpoint):
            raise InvalidRequestError(f"endpoint {endpoint!r} must start with http:// or https://")
        self.endpoint = endpoint.rstrip("/")
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        headers = {"User-Agent": "aicc"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        # httpx drops Authorization when a redirect leaves the endpoint's origin (the CDN).
        self._http = httpx.Client(
            headers=headers,
            follow_redirects=True,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=32),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def list_files(self, repo: str, revision: str = "main") -> list[RemoteFile]:
        """Every file of the repository at `revision`, following pagination.

        Raises ModelNotFoundError (no such repo/revision), PullError (endpoint unreachable,
        refused, or an answer that is not a file list).
        """
        url: str | None = (
            f"{self.endpoint}/api/models/{validate_repo(repo)}/tree/"
            f"{quote(validate_revision(revision), safe='')}"
        )
        params: dict[str, str] | None = {"recursive": "true"}
        files: list[RemoteFile] = []
        for _ in range(MAX_TREE_PAGES):
            if url is None:
                return files
            response = self._get(url, params, what=f"the file list of {repo}")
            files.extend(_parse_tree(response, repo))
            next_link = response.links.get("next", {}).get("url")
            url, params = (str(response.url.join(next_link)) if next_link else None), None
        raise PullError(f"the file list of {repo} has more than {MAX_TREE_PAGES} pages")

    def file_url(self, repo: str, revision: str, path: str) -> str:
        return (
            f"{self.endpoint}/{validate_repo(repo)}/resolve/"
            f"{quote(validate_revision(revision), safe='')}/{quote(path, safe='/')}"
        )

    @contextmanager
    def stream(
        self, repo: str, revision: str, path: str, *, start: int = 0, end: int | None = None
    ) -> Iterator[httpx.Response]:
        """GET the file, from byte `start` to `end` (inclusive) when given; the response is
        checked (2xx) before it is yielded. Raises PullError, ModelNotFoundError."""
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        url = self.file_url(repo, revision, path)
        try:
            with self._http.stream("GET", url, headers=headers) as response:
                _raise_for_status(response, f"{repo}/{path}")
                yield response
        except httpx.HTTPError as exc:
            raise PullError(
                f"download of {path} failed: {_describe(exc)}; run the pull again to resume"
            ) from None

    def _get(self, url: str, params: dict[str, str] | None, *, what: str) -> httpx.Response:
        try:
            response = self._http.get(url, params=params)
        except httpx.HTTPError as exc:
            raise PullError(f"cannot fetch {what} from {self.endpoint}: {_describe(exc)}") from None
        _raise_for_status(response, what)
        return response


def _raise_for_status(response: httpx.Response, what: str) -> None:
    status = response.status_code
    if status < 300:
        return
    if status == 404:
        raise ModelNotFoundError(f"{what} was not found at {response.url.host}")
    if status in (401, 403):
        raise PullError(
            f"{response.url.host} refused access to {what} (HTTP {status}); gated or private "
            f"repositories need a token in ${TOKEN_ENV}"
        )
    if status == 416:
        raise PullError(f"{what}: the server refused the byte range (HTTP 416)")
    raise PullError(f"{response.url.host} answered HTTP {status} for {what}")


def _parse_tree(response: httpx.Response, repo: str) -> list[RemoteFile]:
    try:
        entries: Any = response.json()
    except ValueError:
        raise PullError(f"the file list of {repo} is not JSON") from None
    if not isinstance(entries, list):
        raise PullError(f"the file list of {repo} is not a JSON array")
    files = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("type") != "file":
            continue
        path, size, lfs = entry.get("path"), entry.get("size"), entry.get("lfs")
        if not isinstance(path, str) or type(size) is not int or size < 0:
            raise PullError(f"the file list of {repo} has a malformed entry")
        sha256 = None
        if isinstance(lfs, dict):
            oid = lfs.get("oid") or lfs.get("sha256")
            if isinstance(oid, str) and _SHA256_PATTERN.fullmatch(oid.removeprefix("sha256:")):
                sha256 = oid.removeprefix("sha256:")
            if type(lfs.get("size")) is int:
                size = lfs["size"]
        files.append(RemoteFile(path, size, sha256))
    return files


def _describe(exc: httpx.HTTPError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
