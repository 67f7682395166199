"""`aicc login|whoami|users|keys|roles|totp` against a live HTTP server on loopback.

`identity_server` runs the real /auth and /admin routes and identity service (no engine: the
CLI never asks for inference). The tests only talk HTTP to it through the CLI, so any server
with an admin key can stand in for it.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyotp
import pytest
import uvicorn
from click.testing import CliRunner, Result
from fastapi import FastAPI

from aicc.api.admin import account, keys, roles, users
from aicc.api.app import open_state
from aicc.api.errors import install_error_handlers
from aicc.cli.main import main
from aicc.cli.output import format_time, render_table
from aicc.config import Settings, load_settings
from aicc.tls import init_certs, uvicorn_config

PASSWORD = "Corr3ct-horse-battery"


@dataclass(frozen=True, slots=True)
class IdentityServer:
    url: str
    admin_key: str


def _new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


class ThreadedServer:
    """uvicorn in a thread of the test process, on a free loopback port."""

    def __init__(self, config: uvicorn.Config) -> None:
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> int:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port: int = self.server.servers[0].sockets[0].getsockname()[1]
        return port

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextmanager
def identity_app(settings: Settings) -> Iterator[FastAPI]:
    """The real /auth and /admin routes and identity service, without an engine (the CLI
    never asks for inference), on a fresh state database."""
    app = FastAPI()
    install_error_handlers(app)
    for module in (account, users, keys, roles):
        app.include_router(module.router)
    db = open_state(settings, None, app)
    try:
        yield app
    finally:
        db.close()


@contextmanager
def serve(settings: Settings) -> Iterator[int]:
    with identity_app(settings) as app:
        config = uvicorn_config(app, settings, host="127.0.0.1", port=0, log_level="error")
        with ThreadedServer(config) as port:
            yield port


@pytest.fixture
def identity_server(tmp_path: Path) -> Iterator[IdentityServer]:
    admin_key = _new_token("aicc-sk-")
    settings = load_settings(None, state_dir=tmp_path / "state", admin_key=admin_key)
    with serve(settings) as port:
        yield IdentityServer(f"http://127.0.0.1:{port}", admin_key)


@pytest.fixture
def aicc(identity_server: IdentityServer, tmp_path: Path) -> Any:
    """Run `aicc ARGS` in-process against `identity_server`, with a private config dir."""
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "AICC_SERVER": identity_server.url,
           "AICC_API_KEY": None, "AICC_CACERT": None, "AICC_CLIENT_CERT": None,
           "AICC_CLIENT_KEY": None}  # fmt: skip

    def run(*args: str, stdin: str | None = None, as_admin: bool = False) -> Result:
        extra = ("--api-key", identity_server.admin_key) if as_admin else ()
        return CliRunner(env=env).invoke(main, [*args, *extra], input=stdin)

    return run


def create_alice(aicc: Any) -> None:
    result = aicc("users", "create", "alice", "--role", "user", "--password-stdin",
                  "--rpm", "10", "--tpm", "1000", stdin=PASSWORD + "\n", as_admin=True)  # fmt: skip
    assert result.exit_code == 0, result.output


def login_alice(aicc: Any) -> None:
    result = aicc("login", "--username", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    assert result.exit_code == 0, result.stderr
    assert "Logged in" in result.stdout


def credentials_file(tmp_path: Path) -> Path:
    return tmp_path / "config" / "aicc" / "credentials.json"


def test_login_stores_a_private_token_that_whoami_uses(aicc: Any, tmp_path: Path) -> None:
    create_alice(aicc)
    login_alice(aicc)
    path = credentials_file(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert "aicc-st-" in path.read_text()
    whoami = aicc("whoami")
    assert whoami.exit_code == 0, whoami.stderr
    assert re.search(r"username:\s+alice", whoami.stdout)
    assert re.search(r"via:\s+session ses_", whoami.stdout)


def test_logout_ends_the_session_and_forgets_it(aicc: Any, tmp_path: Path) -> None:
    create_alice(aicc)
    login_alice(aicc)
    token = re.search(r"aicc-st-[\w-]+", credentials_file(tmp_path).read_text())
    assert token is not None
    assert aicc("logout").exit_code == 0
    assert token.group() not in credentials_file(tmp_path).read_text()
    # The server ended it too: the old token is refused.
    assert aicc("whoami", "--api-key", token.group()).exit_code == 1


def test_wrong_password_is_the_servers_message(aicc: Any) -> None:
    create_alice(aicc)
    result = aicc("login", "-u", "alice", "--password-stdin", stdin="nope\n")
    assert result.exit_code == 1
    assert result.stderr.startswith("aicc: error: invalid username")
    assert "aicc login" not in result.stderr  # that is what they just ran


def test_login_asks_for_a_one_time_code_when_the_account_has_one(aicc: Any) -> None:
    create_alice(aicc)
    login_alice(aicc)
    enrolled = aicc("totp", "enroll")
    assert enrolled.exit_code == 0, enrolled.stderr
    match = re.search(r"secret:\s+([A-Z2-7]+)", enrolled.stdout)
    assert match is not None
    assert "otpauth://" in enrolled.stdout
    totp = pyotp.TOTP(match.group(1))
    assert aicc("totp", "confirm", totp.now()).exit_code == 0
    # A step is never accepted twice: log in with the next one (inside valid_window=1).
    next_code = totp.at(time.time() + 30)
    prompted = aicc("login", "-u", "alice", stdin=f"{PASSWORD}\n{next_code}\n")
    assert prompted.exit_code == 0, prompted.stderr
    assert "Authenticator code" in prompted.output
    scripted = aicc("login", "-u", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    assert scripted.exit_code == 1
    assert "--totp-code" in scripted.stderr


def test_key_is_printed_once(aicc: Any) -> None:
    create_alice(aicc)
    login_alice(aicc)
    created = aicc("keys", "create", "--name", "ci", "--expires-in-days", "30")
    assert created.exit_code == 0, created.stderr
    key = created.stdout.strip()
    assert re.fullmatch(r"aicc-sk-[\w-]{43}", key)
    assert "will not be shown again" in created.stderr
    listed = aicc("keys", "list", "--json")
    assert key not in listed.stdout
    assert key[:12] in listed.stdout
    # The key works on its own, and --quiet prints nothing but a key.
    assert re.search(r"via:\s+key key_", aicc("whoami", "--api-key", key).stdout)
    quiet = aicc("keys", "create", "--name", "other", "--quiet")
    assert quiet.stderr == ""
    assert re.fullmatch(r"aicc-sk-[\w-]{43}\n", quiet.stdout)


def test_lists_are_tables(aicc: Any) -> None:
    create_alice(aicc)
    login_alice(aicc)
    aicc("keys", "create", "--name", "ci", "--quiet")
    lines = aicc("keys", "list").stdout.splitlines()
    # Piped (as here): tab-separated with a header, for cut/sort/awk.
    assert lines[0].split("\t") == [
        "KEY ID", "NAME", "USER", "HINT", "SCOPES", "EXPIRES", "LAST USED", "STATUS"
    ]  # fmt: skip
    assert lines[1].split("\t")[1:3] == ["ci", "alice"]
    assert lines[1].endswith("\tactive")
    users = aicc("users", "list", as_admin=True).stdout.splitlines()
    assert [line.split("\t")[0] for line in users] == ["USERNAME", "admin", "alice"]


def test_table_on_a_terminal_is_aligned() -> None:
    text = render_table(("NAME", "ROLES"), [("alice", "user"), ("bob\x1b[2J", "-")], aligned=True)
    assert text.splitlines() == ["NAME      ROLES", "alice     user", "bob?[2J   -"]
    assert format_time("2026-01-01T00:00:00+00:00", relative=True).endswith("ago")


def test_update_keeps_the_limits_not_named(aicc: Any) -> None:
    create_alice(aicc)
    result = aicc("users", "update", "alice", "--rpm", "20", "--tpd", "unlimited", as_admin=True)
    assert result.exit_code == 0, result.stderr
    assert re.search(r"limits:\s+rpm=20 tpm=1000\n", result.stdout)


def test_revoking_someone_elses_key_checks_the_owner(aicc: Any) -> None:
    create_alice(aicc)
    login_alice(aicc)
    key_id = re.search(r"key_\w+", aicc("keys", "create", "--name", "ci").stderr)
    assert key_id is not None
    refused = aicc("keys", "revoke", key_id.group(), "--user", "bob", as_admin=True)
    assert refused.exit_code == 1
    assert "belongs to alice" in refused.stderr
    revoked = aicc("keys", "revoke", key_id.group(), "--user", "alice", as_admin=True)
    assert revoked.exit_code == 0, revoked.stderr
    assert "revoked" in aicc("keys", "list", "--user", "alice", "--all", as_admin=True).stdout


def test_unauthenticated_says_to_log_in(aicc: Any) -> None:
    nobody = aicc("whoami")
    assert nobody.exit_code == 1
    assert "not logged in to http://127.0.0.1:" in nobody.stderr
    create_alice(aicc)
    login_alice(aicc)
    revoked = aicc("users", "revoke-sessions", "alice", as_admin=True)
    assert revoked.stdout == "Revoked 1 session of alice.\n"
    expired = aicc("whoami")
    assert expired.exit_code == 1
    assert expired.stderr.startswith("aicc: error: Invalid API key")
    assert "run `aicc login`" in expired.stderr


def test_no_server_says_to_start_one(aicc: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = aicc("whoami", "--server", f"http://127.0.0.1:{port}/")
    assert result.exit_code == 1
    assert result.stderr == (
        f"aicc: error: no aicc server at http://127.0.0.1:{port}; start one with `aicc serve`\n"
    )


def test_a_credentials_file_others_can_read_is_refused(aicc: Any, tmp_path: Path) -> None:
    create_alice(aicc)
    login_alice(aicc)
    path = credentials_file(tmp_path)
    os.chmod(path, 0o644)
    result = aicc("whoami")
    assert result.exit_code == 1
    assert "readable by other users" in result.stderr
    assert "chmod 600" in result.stderr


def test_self_signed_tls_needs_cacert_and_mtls_a_client_cert(
    aicc: Any, identity_server: IdentityServer, tmp_path: Path
) -> None:
    paths = init_certs(tmp_path / "certs", hosts=["localhost"], client_names=["cli"])
    settings = load_settings(None, state_dir=tmp_path / "tls-state",
                             admin_key=identity_server.admin_key, tls_cert=paths.server_cert,
                             tls_key=paths.server_key, tls_client_ca=paths.ca_cert)  # fmt: skip
    with serve(settings) as port:
        server = f"https://127.0.0.1:{port}"
        unverified = aicc("whoami", "--server", server, as_admin=True)
        assert unverified.exit_code == 1
        assert "pass --cacert" in unverified.stderr
        no_cert = aicc("whoami", "--server", server, "--cacert", str(paths.ca_cert), as_admin=True)
        assert no_cert.exit_code == 1
        assert "--client-cert" in no_cert.stderr
        client = paths.clients[0]
        trusted = aicc("whoami", "--server", server, "--cacert", str(paths.ca_cert),
                       "--client-cert", str(client.cert), "--client-key", str(client.key),
                       as_admin=True)  # fmt: skip
        assert trusted.exit_code == 0, trusted.stderr
        assert re.search(r"username:\s+admin", trusted.stdout)
