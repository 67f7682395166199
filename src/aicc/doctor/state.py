"""State the server depends on: its TLS certificate, the database, the LDAP directory."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from aicc.config import LdapSettings, Settings
from aicc.db import MIGRATIONS_DIR
from aicc.doctor.checks import CheckResult, failed, passed, skipped, warned
from aicc.errors import ConfigError
from aicc.tls import server_ssl_context

CERT_WARN_DAYS = 30
"""A certificate expiring sooner than this is a WARN."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_check(settings: Settings, now: datetime | None = None) -> CheckResult:
    """The certificate and key load and belong together; every certificate given is valid now
    and for the next 30 days."""
    if settings.tls_cert is None:
        if is_loopback(settings.host):
            return passed("tls", f"off: plain HTTP on loopback ({settings.host})")
        return warned(
            "tls",
            f"off: plain HTTP on {settings.host}; API keys cross the network in clear",
            "set tls_cert and tls_key (`aicc certs init`), or terminate TLS at a proxy",
        )
    try:
        server_ssl_context(settings)
    except ConfigError as exc:
        return failed("tls", exc.message, "fix the file, or make a new pair: `aicc certs init`")
    now = now or datetime.now(UTC)
    certificates = [(settings.tls_cert, cert) for cert in _certificates(settings.tls_cert)]
    if settings.tls_client_ca is not None:
        certificates += [(settings.tls_client_ca, c) for c in _certificates(settings.tls_client_ca)]
    path, first = min(certificates, key=lambda item: item[1].not_valid_after_utc)
    subject = first.subject.rfc4514_string() or "(no subject)"
    until = first.not_valid_after_utc
    renew = "renew it (`aicc certs init --force` for aicc's private CA) and restart the server"
    if until <= now:
        return failed("tls", f"{subject} in {path} expired on {until:%Y-%m-%d}", renew)
    for cert_path, cert in certificates:
        if cert.not_valid_before_utc > now:
            return failed(
                "tls",
                f"{cert.subject.rfc4514_string()} in {cert_path} is valid only from "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                "check this machine's clock (NTP), or reissue the certificate",
            )
    days = (until - now) // timedelta(days=1)
    value = f"TLS 1.3; {subject} in {path} valid until {until:%Y-%m-%d} ({days} days)"
    if days < CERT_WARN_DAYS:
        return warned("tls", value, renew)
    return passed("tls", value)


def database_check(settings: Settings, timeout_s: float) -> CheckResult:
    """The state database answers and its schema is the one this aicc migrates to."""
    try:
        url = make_url(settings.resolved_database_url)
    except ArgumentError:
        return failed("database", "database_url is not a SQLAlchemy URL", "fix database_url")
    shown = url.render_as_string(hide_password=True)
    options: dict[str, object] = {}
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:"):
            return passed("database", f"{shown}: in memory")
        if not Path(database).is_file():
            return _sqlite_to_create(shown, Path(database))
        options["connect_args"] = {"timeout": timeout_s}
    elif url.get_backend_name() == "postgresql":
        options["connect_args"] = {"connect_timeout": max(1, round(timeout_s))}
    try:
        engine = create_engine(url, **options)
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        return failed("database", f"{shown}: driver not installed ({exc})", "install the driver")
    try:
        with engine.connect() as connection:
            current = _current_revision(connection)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return failed(
            "database",
            f"cannot connect to {shown}: {reason}",
            "check database_url (host, port, user, password) and that the database server runs",
        )
    finally:
        engine.dispose()
    return _migration_state(shown, current)


def ldap_check(ldap: LdapSettings | None) -> CheckResult:
    """TCP (and for ldaps://, TLS) to the directory; the bind itself is tried at login."""
    if ldap is None:
        return skipped("ldap", "not configured")
    parts = urlsplit(ldap.url)
    is_ldaps = parts.scheme.lower() == "ldaps"
    host = parts.hostname or ""
    try:
        port = parts.port or (636 if is_ldaps else 389)
    except ValueError:
        return failed("ldap", f"{ldap.url}: bad port", "fix ldap.url")
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=ldap.timeout_s) as sock:
            if is_ldaps:
                context = ssl.create_default_context(
                    cafile=str(ldap.ca_file) if ldap.ca_file else None
                )
                with context.wrap_socket(sock, server_hostname=host):
                    pass
    except ssl.SSLError as exc:
        return failed(
            "ldap",
            f"TLS with {where} failed: {exc.reason or exc}",
            "set ldap.ca_file to the CA that signed the directory's certificate",
        )
    except OSError as exc:
        return failed(
            "ldap",
            f"cannot reach {where}: {exc.strerror or exc}",
            "check ldap.url, that the directory runs, and firewalls on the way",
        )
    if is_ldaps:
        return passed("ldap", f"{where} reachable, TLS verified")
    if ldap.start_tls:
        return passed("ldap", f"{where} reachable (StartTLS is negotiated at login)")
    return warned(
        "ldap",
        f"{where} reachable without TLS: passwords cross the network in clear",
        "use ldaps:// or start_tls: true",
    )


def _certificates(path: Path) -> list[x509.Certificate]:
    # server_ssl_context has read and parsed the files already; this cannot fail after it.
    return x509.load_pem_x509_certificates(path.read_bytes())


def _sqlite_to_create(shown: str, path: Path) -> CheckResult:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        return failed(
            "database",
            f"{shown} does not exist and {parent} is not writable",
            "make state_dir writable by the user that runs aicc",
        )
    return passed("database", f"{shown}: not created yet (`aicc serve` creates and migrates it)")


def _current_revision(connection: object) -> str | None:
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(connection)  # type: ignore[arg-type]
    revision: str | None = context.get_current_revision()
    return revision


def _migration_state(shown: str, current: str | None) -> CheckResult:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(MIGRATIONS_DIR))
    head = scripts.get_current_head()
    if current is None:
        return passed("database", f"{shown} reachable; empty (`aicc serve` migrates it)")
    if current == head:
        return passed("database", f"{shown} reachable; schema at {head} (newest)")
    known = {script.revision for script in scripts.walk_revisions()}
    if current in known:
        return warned(
            "database",
            f"{shown} reachable; schema at {current}, this aicc migrates it to {head}",
            "the next `aicc serve` migrates it: upgrade all gateways sharing it together",
        )
    return failed(
        "database",
        f"{shown}: schema at {current}, unknown to this aicc (newest here: {head})",
        "a newer aicc migrated it: upgrade this aicc to that version",
    )
