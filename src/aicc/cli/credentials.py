"""Session tokens the CLI keeps between runs, one per server URL.

The file is `$XDG_CONFIG_HOME/aicc/credentials.json` (default `~/.config/aicc`). A session token
is as good as the password that made it, so the file is created 0600 in a 0700 directory and is
never read when someone else could have read it too.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click

FILE_NAME = "credentials.json"


class CredentialsError(click.ClickException):
    """The credentials file is unsafe or unreadable; the message says how to fix it."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"aicc: error: {self.message}", err=True)


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A session token from `aicc login`, with what the server said about it."""

    token: str
    session_id: str
    username: str
    expires_at: str | None = None
    """ISO-8601, as the server sent it."""


def normalize_server(url: str) -> str:
    """The key a server's session is stored under: scheme and host lower-cased, no trailing
    slash, so `HTTP://Host:8080/` and `http://host:8080` share one login.

    Raises:
        click.BadParameter: not an http(s) URL.
    """
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise click.BadParameter(
            f"{url!r} is not a server URL; use e.g. http://127.0.0.1:8080", param_hint="--server"
        )
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, "", ""))


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "aicc"


def credentials_path() -> Path:
    return config_dir() / FILE_NAME


class CredentialStore:
    """Read and write `credentials.json`. Each write replaces the whole file atomically."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else credentials_path()

    def get(self, server: str) -> StoredSession | None:
        """The session stored for `server`, or None.

        Raises:
            CredentialsError: the file is group/world readable, not ours, or not valid JSON.
        """
        entry = self._load().get(normalize_server(server))
        if not isinstance(entry, dict):
            return None
        try:
            return StoredSession(**entry)
        except TypeError:
            # A file written by a newer/older aicc: treat the entry as absent, not as fatal.
            return None

    def put(self, server: str, session: StoredSession) -> None:
        """Store `session` for `server`, replacing any earlier one.

        Raises:
            CredentialsError: the existing file is unsafe or unreadable.
        """
        servers = self._load()
        servers[normalize_server(server)] = asdict(session)
        self._write(servers)

    def delete(self, server: str) -> bool:
        """Forget the session for `server`; False when there was none.

        Raises:
            CredentialsError: the existing file is unsafe or unreadable.
        """
        servers = self._load()
        if servers.pop(normalize_server(server), None) is None:
            return False
        self._write(servers)
        return True

    def _load(self) -> dict[str, Any]:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise CredentialsError(f"cannot read {self.path}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as file:
            # fstat on the open descriptor: the mode checked is the mode of the file read.
            info = os.fstat(file.fileno())
            if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise CredentialsError(
                    f"{self.path} is readable by other users (mode "
                    f"{stat.S_IMODE(info.st_mode):04o}); its tokens may have leaked: run "
                    f"`chmod 600 {self.path}` and `aicc login` again"
                )
            if hasattr(os, "getuid") and info.st_uid != os.getuid():
                raise CredentialsError(f"{self.path} belongs to another user; remove it")
            raw = file.read()
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise CredentialsError(f"{self.path} is not valid JSON; remove it") from exc
        servers = data.get("servers") if isinstance(data, dict) else None
        return dict(servers) if isinstance(servers, dict) else {}

    def _write(self, servers: dict[str, Any]) -> None:
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is masked by umask and ignored for an existing directory.
        os.chmod(directory, 0o700)
        tmp = directory / f".{self.path.name}.{os.getpid()}.tmp"
        payload = json.dumps({"servers": servers}, indent=2, sort_keys=True).encode()
        tmp.unlink(missing_ok=True)  # left by a crashed run that had our pid
        # Created 0600 from the first byte: a chmod after writing would leave a window.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(payload)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
