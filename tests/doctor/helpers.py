"""Configs, certificates and ports for the doctor tests."""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aicc.cli.doctor import doctor


def write_config(path: Path, **settings: Any) -> Path:
    """A YAML settings file; Path values are written as strings."""
    plain = {
        key: str(value) if isinstance(value, Path) else value for key, value in settings.items()
    }
    path.write_text(yaml.safe_dump(plain))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_cert(
    directory: Path, *, not_before: datetime, not_after: datetime, name: str = "server"
) -> tuple[Path, Path]:
    """A self-signed EC certificate valid from `not_before` to `not_after`, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name}.test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def days_from_now(days: float) -> datetime:
    return datetime.now(UTC) + timedelta(days=days)


def run_cli(*args: str) -> Result:
    return CliRunner().invoke(doctor, list(args), catch_exceptions=False)


def checks_by_name(result: Result) -> dict[str, dict[str, str]]:
    """`--json` output as name → check."""
    data = json.loads(result.stdout)
    return {check["name"]: check for check in data["checks"]}


def table_rows(result: Result) -> dict[str, list[str]]:
    """Plain (piped) table output as name → [status, value, fix]."""
    rows = {}
    for line in result.stdout.splitlines()[1:]:
        cells = line.split("\t")
        if len(cells) == 4:
            rows[cells[0]] = cells[1:]
    return rows
