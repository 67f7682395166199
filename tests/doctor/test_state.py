"""TLS certificate, state database and LDAP checks against real files, databases, sockets."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import text

from aicc.config import LdapSettings, load_settings
from aicc.db import Database
from aicc.doctor.checks import Status
from aicc.doctor.state import database_check, ldap_check, tls_check
from tests.doctor.helpers import days_from_now, free_port, write_cert


def test_plain_http_passes_on_loopback_and_warns_elsewhere(tmp_path: Path) -> None:
    assert tls_check(load_settings(state_dir=tmp_path)).status is Status.PASS
    exposed = tls_check(load_settings(state_dir=tmp_path, host="0.0.0.0"))
    assert exposed.status is Status.WARN
    assert "aicc certs init" in exposed.fix


def test_a_valid_certificate_passes(tmp_path: Path) -> None:
    cert, key = write_cert(tmp_path, not_before=days_from_now(-1), not_after=days_from_now(365))
    result = tls_check(load_settings(state_dir=tmp_path, tls_cert=cert, tls_key=key))
    assert result.status is Status.PASS
    assert "CN=server.test" in result.value
    assert "(364 days)" in result.value


def test_a_certificate_expiring_soon_warns(tmp_path: Path) -> None:
    cert, key = write_cert(tmp_path, not_before=days_from_now(-300), not_after=days_from_now(10))
    result = tls_check(load_settings(state_dir=tmp_path, tls_cert=cert, tls_key=key))
    assert result.status is Status.WARN
    assert "renew" in result.fix


def test_a_certificate_not_yet_valid_fails(tmp_path: Path) -> None:
    cert, key = write_cert(tmp_path, not_before=days_from_now(2), not_after=days_from_now(90))
    result = tls_check(load_settings(state_dir=tmp_path, tls_cert=cert, tls_key=key))
    assert result.status is Status.FAIL
    assert "clock" in result.fix


def test_an_expired_client_ca_fails(tmp_path: Path) -> None:
    cert, key = write_cert(tmp_path, not_before=days_from_now(-1), not_after=days_from_now(90))
    ca, _ = write_cert(
        tmp_path, not_before=days_from_now(-90), not_after=days_from_now(-2), name="ca"
    )
    settings = load_settings(state_dir=tmp_path, tls_cert=cert, tls_key=key, tls_client_ca=ca)
    result = tls_check(settings)
    assert result.status is Status.FAIL
    assert f"CN=ca.test in {ca} expired" in result.value


def test_a_key_of_another_certificate_fails(tmp_path: Path) -> None:
    cert, _ = write_cert(tmp_path, not_before=days_from_now(-1), not_after=days_from_now(90))
    _, other_key = write_cert(
        tmp_path, not_before=days_from_now(-1), not_after=days_from_now(90), name="other"
    )
    result = tls_check(load_settings(state_dir=tmp_path, tls_cert=cert, tls_key=other_key))
    assert result.status is Status.FAIL
    assert "is not the private key of" in result.value


def test_a_database_not_created_yet_passes(tmp_path: Path) -> None:
    result = database_check(load_settings(state_dir=tmp_path / "new"), timeout_s=5)
    assert result.status is Status.PASS
    assert "not created yet" in result.value
    assert not (tmp_path / "new").exists()


@pytest.fixture
def migrated(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'aicc.db'}")
    db.migrate()
    yield db
    db.close()


def test_a_migrated_database_passes(tmp_path: Path, migrated: Database) -> None:
    result = database_check(load_settings(state_dir=tmp_path), timeout_s=5)
    assert result.status is Status.PASS
    assert "(newest)" in result.value


def test_an_older_schema_warns_and_an_unknown_one_fails(tmp_path: Path, migrated: Database) -> None:
    settings = load_settings(state_dir=tmp_path)
    with migrated.session() as session:
        session.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    older = database_check(settings, timeout_s=5)
    assert older.status is Status.WARN
    assert "schema at 0001" in older.value
    with migrated.session() as session:
        session.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    newer = database_check(settings, timeout_s=5)
    assert newer.status is Status.FAIL
    assert "upgrade this aicc" in newer.fix


def ldap(url: str, ca_file: Path | None = None) -> LdapSettings:
    return LdapSettings(
        url=url,
        bind_dn="cn=svc,dc=test",
        bind_password=SecretStr("secret"),
        user_base="ou=people,dc=test",
        ca_file=ca_file,
        timeout_s=2,
    )


def test_ldap_unconfigured_is_skipped() -> None:
    assert ldap_check(None).status is Status.SKIP


def test_unreachable_ldap_fails() -> None:
    port = free_port()
    result = ldap_check(ldap(f"ldap://127.0.0.1:{port}"))
    assert result.status is Status.FAIL
    assert f"cannot reach 127.0.0.1:{port}" in result.value


def test_reachable_plain_ldap_warns_about_clear_text() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = ldap_check(ldap(f"ldap://127.0.0.1:{port}"))
    assert result.status is Status.WARN
    assert "ldaps://" in result.fix


def test_ldaps_with_an_unverifiable_certificate_fails(tmp_path: Path) -> None:
    cert, key = write_cert(tmp_path, not_before=days_from_now(-1), not_after=days_from_now(90))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def handshake() -> None:
            connection, _ = listener.accept()
            try:
                with context.wrap_socket(connection, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client rejected the certificate: the point of the test

        server = threading.Thread(target=handshake)
        server.start()
        result = ldap_check(ldap(f"ldaps://127.0.0.1:{port}"))
        server.join(timeout=10)
    assert result.status is Status.FAIL
    assert "CERTIFICATE_VERIFY_FAILED" in result.value
    assert "ldap.ca_file" in result.fix
