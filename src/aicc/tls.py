"""HTTPS for the gateway: a TLS 1.3-only server context (optionally mTLS), and a private CA
that `aicc certs init` creates for deployments without a PKI of their own."""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aicc.config import Settings
from aicc.edge import HeaderLimits, guarded_protocol
from aicc.errors import ConfigError

DEFAULT_DAYS = 825
"""Validity of generated certificates: the longest that Apple's TLS clients accept."""

MAX_DAYS = 3650

_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}(@[A-Za-z0-9][A-Za-z0-9.-]{0,190})?$")
"""A host-style name (``ci-runner``) or an e-mail address (``alice@example.org``)."""
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# Clocks of freshly started machines and containers drift; a certificate valid only from "now"
# is rejected by a client a few seconds behind.
_BACKDATE = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class ClientCertPaths:
    name: str
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class CertPaths:
    """What `init_certs` wrote. Keys are mode 0600."""

    ca_cert: Path
    """Give to clients (`--cacert`) and to the server as `tls_client_ca` for mTLS."""
    ca_key: Path
    """Signs further certificates; keep it offline once the certificates exist."""
    server_cert: Path
    server_key: Path
    clients: tuple[ClientCertPaths, ...]


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context, or None when `tls_cert` is not set (plain HTTP).

    TLS 1.3 only; with `tls_client_ca` every client must present a certificate that CA signed.
    Raises ConfigError naming the setting and file when a file is missing, unreadable, not
    PEM, an encrypted key, or a key that does not belong to the certificate.
    """
    if settings.tls_cert is None:
        return None
    if settings.tls_key is None:
        raise ConfigError("tls_cert needs tls_key (the certificate's private key)")
    cert = _load_certificates("tls_cert", settings.tls_cert)[0]
    key = _load_private_key("tls_key", settings.tls_key)
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise ConfigError(
            f"tls_key {str(settings.tls_key)!r} is not the private key of "
            f"tls_cert {str(settings.tls_cert)!r}"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Pinned, not just a floor: MLPS 2.0 / internal policies ask for TLS 1.3 alone, and
    # uvicorn's own ssl_* options cannot express a protocol range.
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls_cert {str(settings.tls_cert)!r} / tls_key {str(settings.tls_key)!r} "
            f"were rejected by OpenSSL: {exc.reason or exc}"
        ) from None
    if settings.tls_client_ca is not None:
        _load_certificates("tls_client_ca", settings.tls_client_ca)
        try:
            context.load_verify_locations(cafile=settings.tls_client_ca)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"tls_client_ca {str(settings.tls_client_ca)!r} was rejected by OpenSSL: "
                f"{exc.reason or exc}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def uvicorn_config(app: Any, settings: Settings, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn Config serving `app` on settings.host:port, over HTTPS when TLS is set, with
    the edge's limits: header timeout and size (`aicc.edge`), connections, keep-alive.

    `kwargs` are passed to uvicorn.Config and override these options. Raises ConfigError as
    `server_ssl_context` does — here, before any socket is bound.
    """
    limits = HeaderLimits(
        timeout_s=settings.header_timeout_s,
        max_bytes=settings.max_header_bytes,
        retry_after_s=settings.retry_after_s,
    )
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "http": guarded_protocol(limits),
        # Beyond it a 503 with Retry-After (slow connections count until their header timeout).
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_s,
        # Bounds headers if `http="h11"` is passed instead of our protocol.
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }
    options.update(kwargs)
    context = server_ssl_context(settings)
    if context is None:
        return uvicorn.Config(app, **options)

    def use_our_context(_config: uvicorn.Config, _default: Any) -> ssl.SSLContext:
        return context

    # uvicorn's documented hook: `Config.load()` installs the returned context as `config.ssl`
    # (what `loop.create_server` is given), and `is_ssl` turns true, so logs say https.
    return uvicorn.Config(app, ssl_context_factory=use_our_context, **options)


def init_certs(
    directory: Path,
    *,
    hosts: Sequence[str],
    days: int = DEFAULT_DAYS,
    client_names: Sequence[str] = (),
    force: bool = False,
) -> CertPaths:
    """Create a private CA (EC P-256), a server certificate it signs for `hosts` plus the
    loopback names, and a client certificate (for mTLS) per name in `client_names`.

    Raises ConfigError for a bad host or client name, days outside 1..3650, or when any of
    the files exists already and `force` is false (nothing is written then).
    """
    if not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"days={days}: must be between 1 and {MAX_DAYS}")
    names = [_subject_alt_name(host) for host in dict.fromkeys([*hosts, *_LOOPBACK_HOSTS])]
    for client in client_names:
        if not _CLIENT_NAME.match(client):
            raise ConfigError(
                f"client name {client!r}: give a host-style name or an e-mail address"
            )
    paths = CertPaths(
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca-key.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        clients=tuple(
            ClientCertPaths(
                name, directory / f"client-{name}.pem", directory / f"client-{name}-key.pem"
            )
            for name in dict.fromkeys(client_names)
        ),
    )
    every_path = [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key]
    every_path += [path for client in paths.clients for path in (client.cert, client.key)]
    existing = [str(path) for path in every_path if path.exists()]
    if existing and not force:
        raise ConfigError(f"refusing to overwrite {', '.join(existing)} (use --force)")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    not_before = datetime.now(UTC) - _BACKDATE
    not_after = not_before + _BACKDATE + timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aicc private CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), ca_key.public_key(), not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(is_ca=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    _write(paths.ca_key, _private_pem(ca_key), mode=0o600)

    leaves = [
        (paths.server_cert, paths.server_key, str(names[0].value), ExtendedKeyUsageOID.SERVER_AUTH)
    ]
    leaves += [
        (client.cert, client.key, client.name, ExtendedKeyUsageOID.CLIENT_AUTH)
        for client in paths.clients
    ]
    for cert_path, key_path, common_name, usage in leaves:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (
            _builder(subject, ca_name, key.public_key(), ca_key.public_key(), not_before, not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(is_ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        # RFC 5280 verifiers (cryptography's ClientVerifier among them) require a SAN on
        # client certificates too: the client's identity is its name or e-mail address.
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            alt_names = names
        elif "@" in common_name:
            alt_names = [x509.RFC822Name(common_name)]
        else:
            alt_names = [x509.DNSName(common_name)]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        _write(key_path, _private_pem(key), mode=0o600)
    return paths


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer_key: ec.EllipticCurvePublicKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    # Key identifiers on every certificate: RFC 5280 path building and strict verifiers
    # (cryptography's, Go's) look for them.
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False
        )
    )


def _key_usage(*, is_ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not is_ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=is_ca,
        crl_sign=is_ca,
        encipher_only=False,
        decipher_only=False,
    )


def _subject_alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", host) or ".." in host:
        raise ConfigError(f"host {host!r} is neither a DNS name nor an IP address")
    return x509.DNSName(host)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, mode: int) -> None:
    # Created with its final mode (no window in which a key is world-readable); fchmod also
    # tightens a file that --force overwrites.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as file:
        os.fchmod(file.fileno(), mode)
        file.write(data)


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting} {str(path)!r} cannot be read: {exc.strerror}") from None


def _load_certificates(setting: str, path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(_read(setting, path))
    except ValueError:
        raise ConfigError(f"{setting} {str(path)!r} is not a PEM certificate") from None


def _load_private_key(setting: str, path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(_read(setting, path), password=None)
    except TypeError:
        raise ConfigError(
            f"{setting} {str(path)!r} is encrypted; give an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{setting} {str(path)!r} is not a PEM private key") from None


def _public_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
