"""`aicc models encrypt|decrypt|rotate-key|quantize`: act on the model directory and the state
database directly, like the rest of `aicc models`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import click

from aicc.cli.client import CliError
from aicc.config import Settings, load_settings
from aicc.errors import AiccError
from aicc.store.crypto import key_id

if TYPE_CHECKING:
    from aicc.store.registry import ModelRegistry

P = ParamSpec("P")
T = TypeVar("T")

config_option = click.option(
    "--config", "config_file", type=click.Path(path_type=Path), help="YAML settings file."
)


@click.command("encrypt")
@click.argument("ref")
@config_option
def encrypt(ref: str, config_file: Path | None) -> None:
    """Encrypt a registered model at rest (AES-256-GCM) with the configured model key."""
    from aicc.store.model_keys import load_model_key
    from aicc.store.ops import encrypt_model

    with _registry(config_file) as (settings, registry):
        key = _call(load_model_key, settings)
        record = _call(encrypt_model, registry, settings.model_dir, ref, key)
    click.echo(f"encrypted {record.ref} ({len(record.files)} file(s), key id {key_id(key)})")


@click.command("decrypt")
@click.argument("ref")
@config_option
def decrypt(ref: str, config_file: Path | None) -> None:
    """Store a registered model in plaintext again."""
    from aicc.store.model_keys import load_model_key
    from aicc.store.ops import decrypt_model

    with _registry(config_file) as (settings, registry):
        key = _call(load_model_key, settings)
        record = _call(decrypt_model, registry, settings.model_dir, ref, key)
    click.echo(f"decrypted {record.ref} ({len(record.files)} file(s))")


@click.command("rotate-key")
@click.argument("ref")
@click.option(
    "--old-key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The key the model is encrypted with now (64 hex characters, mode 0600).",
)
@config_option
def rotate_key(ref: str, old_key_file: Path, config_file: Path | None) -> None:
    """Re-encrypt a model under the configured key (crash-safe, file by file)."""
    from aicc.store.model_keys import load_model_key, read_key_file
    from aicc.store.ops import rotate_model_key

    with _registry(config_file) as (settings, registry):
        old_key = _call(read_key_file, old_key_file)
        new_key = _call(load_model_key, settings)
        if old_key == new_key:
            raise CliError("the old key is the configured key; configure the new key first")
        record = _call(rotate_model_key, registry, settings.model_dir, ref, old_key, new_key)
    click.echo(f"re-encrypted {record.ref} under key id {key_id(new_key)}")


@click.command("quantize")
@click.argument("ref")
@click.option(
    "--type",
    "qtype",
    required=True,
    metavar="TYPE",
    help="Q4_K_M, Q5_K_M, Q8_0, Q4_0, Q6_K, … (see the error for the full list).",
)
@click.option("--name", "new_ref", metavar="NAME[:TAG]", help="[default: <name>:<type>]")
@click.option("--threads", type=click.IntRange(1, 1024), help="[default: all CPUs]")
@config_option
def quantize(
    ref: str, qtype: str, new_ref: str | None, threads: int | None, config_file: Path | None
) -> None:
    """Quantize a model with llama.cpp and register the result (parent: REF)."""
    from aicc.store.model_keys import find_model_key, load_model_key
    from aicc.store.ops import quantize_model

    with _registry(config_file) as (settings, registry):
        loader = load_model_key if settings.model_encrypt else find_model_key
        key = _call(loader, settings)
        click.echo(f"quantizing {ref} to {qtype.upper()} …", err=True)
        record = _call(
            quantize_model,
            registry,
            settings.model_dir,
            ref,
            qtype,
            new_ref,
            key,
            encrypt=settings.model_encrypt,
            threads=threads,
        )
    suffix = ", encrypted" if record.encrypted else ""
    click.echo(
        f"created {record.ref} ({record.quantization or qtype.upper()}, "
        f"{record.size_bytes / 2**20:.1f} MiB{suffix}) from {record.parent}"
    )


ALL_COMMANDS = (encrypt, decrypt, rotate_key, quantize)
"""For `models.add_command` in `aicc.cli.main`."""


@contextmanager
def _registry(config_file: Path | None) -> Iterator[tuple[Settings, ModelRegistry]]:
    from aicc.db import Database
    from aicc.store.registry import ModelRegistry

    settings = _call(load_settings, config_file)
    database = _call(Database, settings.resolved_database_url)
    try:
        _call(database.migrate)
        yield settings, ModelRegistry(database, settings.model_dir)
    finally:
        database.close()


def _call(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call `function`, turning a domain error into the CLI's error line."""
    try:
        return function(*args, **kwargs)
    except AiccError as exc:
        raise CliError(exc.message) from None
