"""HTTPS as a client meets it: a real uvicorn server on loopback, real TLS handshakes."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import uvicorn
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from aicc.cli.main import main
from aicc.config import Settings
from aicc.errors import ConfigError
from aicc.tls import CertPaths, init_certs, server_ssl_context, uvicorn_config


async def _scheme(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.url.scheme)


APP = Starlette(routes=[Route("/", _scheme)])


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    directory = tmp_path_factory.mktemp("tls")
    return init_certs(directory, hosts=["gw.example.org"], days=30, client_names=["alice"])


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """A second, unrelated CA: its client certificate must not pass mTLS."""
    directory = tmp_path_factory.mktemp("tls-other")
    return init_certs(directory, hosts=[], days=30, client_names=["mallory"])


@contextmanager
def https_server(settings: Settings) -> Iterator[str]:
    server = uvicorn.Server(uvicorn_config(APP, settings, port=0, log_level="critical"))
    thread = threading.Thread(target=server.run, name="tls-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the TLS test server did not start")
        time.sleep(0.02)
    try:
        yield f"https://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def tls_settings(certs: CertPaths, *, mtls: bool = False) -> Settings:
    return Settings(
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca_cert if mtls else None,
    )


def client_context(certs: CertPaths) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certs.ca_cert)


def handshake_version(url: str, context: ssl.SSLContext) -> str | None:
    port = int(url.rsplit(":", 1)[1])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.version()


@pytest.fixture(scope="module")
def https_url(certs: CertPaths) -> Iterator[str]:
    with https_server(tls_settings(certs)) as url:
        yield url


@pytest.fixture(scope="module")
def mtls_url(certs: CertPaths) -> Iterator[str]:
    with https_server(tls_settings(certs, mtls=True)) as url:
        yield url


def test_tls13_client_verifying_the_ca_is_served(certs: CertPaths, https_url: str) -> None:
    response = httpx.get(https_url, verify=client_context(certs))
    assert response.status_code == 200
    assert response.text == "https"
    assert handshake_version(https_url, client_context(certs)) == "TLSv1.3"


def test_tls12_client_is_refused(certs: CertPaths, https_url: str) -> None:
    context = client_context(certs)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        handshake_version(https_url, context)


def test_client_without_the_ca_does_not_trust_the_server(https_url: str) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(https_url, verify=ssl.create_default_context())


def test_plain_http_without_tls_settings() -> None:
    assert server_ssl_context(Settings()) is None
    assert uvicorn_config(APP, Settings()).is_ssl is False


def test_mtls_requires_a_client_certificate_from_the_ca(
    certs: CertPaths, other_certs: CertPaths, mtls_url: str
) -> None:
    with pytest.raises((httpx.TransportError, ssl.SSLError)):
        httpx.get(mtls_url, verify=client_context(certs))

    stranger = client_context(certs)
    stranger.load_cert_chain(other_certs.clients[0].cert, other_certs.clients[0].key)
    with pytest.raises((httpx.TransportError, ssl.SSLError)):
        httpx.get(mtls_url, verify=stranger)

    alice = client_context(certs)
    alice.load_cert_chain(certs.clients[0].cert, certs.clients[0].key)
    response = httpx.get(mtls_url, verify=alice)
    assert response.status_code == 200


def test_server_certificate_chain_verifies(certs: CertPaths) -> None:
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    policy = PolicyBuilder().store(Store([ca])).time(datetime.now(UTC))
    for name in (DNSName("localhost"), DNSName("gw.example.org")):
        chain = policy.build_server_verifier(name).verify(leaf, [])
        assert chain[-1] == ca
    for address in ("127.0.0.1", "::1"):
        policy.build_server_verifier(IPAddress(ipaddress.ip_address(address))).verify(leaf, [])
    with pytest.raises(x509.verification.VerificationError):
        policy.build_server_verifier(DNSName("elsewhere.example.org")).verify(leaf, [])

    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    client = x509.load_pem_x509_certificate(certs.clients[0].cert.read_bytes())
    purposes = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(purposes) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    verified = PolicyBuilder().store(Store([ca])).build_client_verifier().verify(client, [])
    assert verified.chain[-1] == ca
    assert verified.subjects == [x509.DNSName("alice")]


def test_bad_files_stop_start_up_naming_the_file(
    certs: CertPaths, other_certs: CertPaths, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=r"tls_cert .*missing\.pem.* cannot be read"):
        server_ssl_context(Settings(tls_cert=missing, tls_key=certs.server_key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"tls_key .*garbage\.pem.* not a PEM private key"):
        server_ssl_context(Settings(tls_cert=certs.server_cert, tls_key=garbage))
    with pytest.raises(ConfigError, match=r"tls_client_ca .*garbage\.pem.* not a PEM cert"):
        server_ssl_context(
            Settings(tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=garbage)
        )
    with pytest.raises(ConfigError, match=r"tls_key .*server-key\.pem.* is not the private key"):
        server_ssl_context(Settings(tls_cert=other_certs.server_cert, tls_key=certs.server_key))


def test_keys_are_private_and_never_overwritten(tmp_path: Path) -> None:
    paths = init_certs(tmp_path, hosts=["10.0.0.7"], days=1, client_names=["bob@example.org"])
    for key in (paths.ca_key, paths.server_key, paths.clients[0].key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = paths.server_key.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        init_certs(tmp_path, hosts=[], days=1, client_names=[])
    assert paths.server_key.read_bytes() == before
    init_certs(tmp_path, hosts=[], days=1, client_names=[], force=True)
    assert paths.server_key.read_bytes() != before
    with pytest.raises(ConfigError, match="neither a DNS name nor an IP"):
        init_certs(tmp_path / "x", hosts=["bad host"], days=1, client_names=[])
    with pytest.raises(ConfigError, match=r"client name '\.\./evil'"):
        init_certs(tmp_path / "x", hosts=[], days=1, client_names=["../evil"])


def test_cli_certs_init(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    args = ["certs", "init", "--dir", str(directory), "--host", "gw.internal", "--client", "ci"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"aicc serve --tls-cert {directory / 'server.pem'}" in result.output
    assert f"--tls-client-ca {directory / 'ca.pem'}" in result.output
    for name in ("ca-key.pem", "server-key.pem", "client-ci-key.pem"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    leaf = x509.load_pem_x509_certificate((directory / "server.pem").read_bytes())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "gw.internal" in names.get_values_for_type(x509.DNSName)

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2
    assert "refusing to overwrite" in again.output
