"""`aicc models`: the local model store (list, show, rm, pull, import, catalog). These act on
the model directory and the state database directly, not through a server."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import ParamSpec, TypeVar

import click

from aicc.cli.client import CliError
from aicc.cli.output import echo_fields, echo_json, echo_table, is_terminal
from aicc.config import Settings, load_settings
from aicc.errors import AiccError
from aicc.store.catalog import CATALOG, DEFAULT_QUANT, GIB, total_memory_bytes
from aicc.store.download import PullProgress
from aicc.store.local import list_models
from aicc.store.registry import ModelRecord, ModelRegistry
from aicc.units import human_size

config_option = click.option(
    "--config", "config_file", type=click.Path(path_type=Path), help="YAML settings file."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group()
def models() -> None:
    """Models on this machine: list, pull, import, remove."""


@models.command("list")
@config_option
@json_option
def models_list(config_file: Path | None, as_json: bool) -> None:
    """Show the models `aicc serve --model` can load."""
    with _store(config_file, create=False) as (settings, registry):
        records = registry.list() if registry is not None else []
        rows = []
        for model in list_models(settings.model_dir):
            size = human_size(model.size_bytes) if model.size_bytes is not None else "-"
            if model.is_bundled:
                source = "bundled" if model.is_present else "bundled (assembled on first serve)"
            else:
                source = "model dir"
            rows.append((model.name, size, "-", source, str(model.path)))
        for record in records:
            source = record.source + (" (encrypted)" if record.encrypted else "")
            rows.append(
                (
                    record.ref,
                    human_size(record.size_bytes),
                    record.quantization or "-",
                    source,
                    str(record.directory(settings.model_dir)),
                )
            )
    if as_json:
        keys = ("name", "size", "quantization", "source", "path")
        echo_json([dict(zip(keys, row, strict=True)) for row in rows])
        return
    echo_table(("NAME", "SIZE", "QUANT", "SOURCE", "PATH"), rows)


@models.command("show")
@click.argument("ref")
@config_option
@json_option
def models_show(ref: str, config_file: Path | None, as_json: bool) -> None:
    """Show one registered model (NAME[:TAG])."""
    with _store(config_file, create=False) as (settings, registry):
        if registry is None:
            raise CliError(f"model {ref!r} is not registered (no state database yet)")
        record = _call(registry.get, ref)
        paths = record.paths(settings.model_dir)
    if as_json:
        data = asdict(record)
        data.update(
            ref=record.ref,
            paths=[str(p) for p in paths],
            created_at=record.created_at.isoformat(),
            updated_at=record.updated_at.isoformat(),
        )
        echo_json(data)
        return
    echo_record(record, paths)


def echo_record(record: ModelRecord, paths: list[Path]) -> None:
    params = record.parameter_count
    template = record.chat_template
    echo_fields(
        [
            ("name", record.ref),
            ("source", record.source),
            ("size", human_size(record.size_bytes)),
            ("architecture", record.architecture),
            ("parameters", f"{params / 1e9:.2f} B" if params else None),
            ("quantization", record.quantization),
            ("context length", record.context_length),
            ("chat template", f"{len(template)} characters" if template else None),
            ("encrypted", "yes" if record.encrypted else "no"),
            ("parent", record.parent),
            ("created", record.created_at.isoformat(timespec="seconds")),
            ("updated", record.updated_at.isoformat(timespec="seconds")),
        ]
    )
    for path, digest in zip(paths, record.sha256, strict=True):
        click.echo(f"file: {path}  sha256:{digest}")


@models.command("rm")
@click.argument("ref")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@config_option
def models_rm(ref: str, yes: bool, config_file: Path | None) -> None:
    """Remove a registered model (NAME[:TAG]) and its files."""
    with _store(config_file, create=False) as (settings, registry):
        if registry is None:
            raise CliError(f"model {ref!r} is not registered (no state database yet)")
        record = _call(registry.get, ref)
        if not yes:
            directory = record.directory(settings.model_dir)
            click.confirm(f"Remove {record.ref} and delete {directory}?", abort=True, err=True)
        _call(registry.remove, record.ref)
    click.echo(f"removed {record.ref}")


@models.command("pull")
@click.argument("spec", metavar="ALIAS|hf:OWNER/REPO[@REV][:FILE]")
@click.option("--quant", default=DEFAULT_QUANT, show_default=True, help="Quantization to fetch.")
@click.option("--endpoint", help="Hugging Face-compatible endpoint (a mirror, ModelScope).")
@click.option("--name", "ref", help="Register as NAME[:TAG] (default: the alias or repo).")
@config_option
def models_pull(
    spec: str, quant: str, endpoint: str | None, ref: str | None, config_file: Path | None
) -> None:
    """Download a model, verify it, and register it. An interrupted pull resumes."""
    from aicc.store.hub import HubClient
    from aicc.store.pull import plan_pull, pull_model

    with _store(config_file, create=True) as (settings, registry):
        assert registry is not None
        key = _encryption_key(settings)
        try:
            with HubClient(endpoint or settings.hf_endpoint) as hub:
                plan = plan_pull(hub, spec, quant=quant)
                click.echo(
                    f"pulling {plan.source} ({len(plan.files)} file(s), "
                    f"{human_size(plan.size_bytes)})",
                    err=True,
                )
                bar = ProgressLine()
                record = pull_model(
                    registry, hub, plan, ref=ref, encrypt_key=key, progress=bar.update,
                    warn=lambda message: click.echo(f"aicc: warning: {message}", err=True),
                )  # fmt: skip
                bar.finish()
        except KeyboardInterrupt:
            raise CliError("interrupted; run the same pull again to resume") from None
        except AiccError as exc:
            raise CliError(exc.message) from None
    click.echo(f"pulled {record.ref} ({human_size(record.size_bytes)})")


@models.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", "ref", required=True, help="Register as NAME[:TAG].")
@click.option("--move", is_flag=True, help="Delete the original once imported.")
@config_option
def models_import(path: Path, ref: str, move: bool, config_file: Path | None) -> None:
    """Copy a GGUF or safetensors file from disk into the store (air-gapped sites)."""
    from aicc.store.importer import import_model

    with _store(config_file, create=True) as (settings, registry):
        assert registry is not None
        key = _encryption_key(settings)
        record = _call(import_model, registry, path, ref, move=move, encrypt_key=key)
    click.echo(f"imported {record.ref} ({human_size(record.size_bytes)})")


@models.command("catalog")
@json_option
def models_catalog(as_json: bool) -> None:
    """Models `aicc models pull` knows by name, with the memory each needs."""
    total = total_memory_bytes()
    if as_json:
        echo_json(
            [
                {
                    "alias": e.alias,
                    "repo": e.repo,
                    "description": e.description,
                    "quantizations": {q: e.size_bytes(q) for q in e.quantizations},
                    "min_memory_bytes": e.min_memory_bytes(),
                }
                for e in CATALOG
            ]
        )
        return
    rows = []
    for entry in CATALOG:
        needed = entry.min_memory_bytes()
        fits = "-" if total is None else ("yes" if total >= needed else "no")
        rows.append(
            (
                entry.alias,
                f"{entry.size_bytes() / GIB:.1f} GiB",
                f"{needed / GIB:.0f} GiB",
                fits,
                ",".join(entry.quantizations),
                entry.repo,
            )
        )
    echo_table(("ALIAS", "SIZE", "MIN MEMORY", "FITS", "QUANTS", "REPOSITORY"), rows)
    if is_terminal():
        click.echo(
            f"\nsizes are for {DEFAULT_QUANT}; `aicc models pull ALIAS --quant Q8_0` for others"
        )


class ProgressLine:
    """Size, speed and ETA on stderr: redrawn in place on a terminal, a line every few seconds
    when piped."""

    def __init__(self) -> None:
        self.is_terminal = sys.stderr.isatty()
        self.last_line = 0.0
        self.drawn = False

    def update(self, progress: PullProgress) -> None:
        now = time.monotonic()
        if not self.is_terminal and now - self.last_line < 5 and not progress.is_verifying:
            return
        self.last_line = now
        click.echo(
            ("\r\x1b[K" if self.is_terminal else "") + format_progress(progress),
            err=True,
            nl=not self.is_terminal,
        )
        self.drawn = True

    def finish(self) -> None:
        if self.is_terminal and self.drawn:
            click.echo("", err=True)


def format_progress(progress: PullProgress) -> str:
    if progress.is_verifying:
        return f"{progress.file}: {human_size(progress.total_bytes)} downloaded, verifying"
    percent = 100 * progress.done_bytes / progress.total_bytes if progress.total_bytes else 100
    eta = progress.eta_s
    eta_text = "--:--" if eta is None else f"{int(eta) // 60:d}:{int(eta) % 60:02d}"
    return (
        f"{progress.file}: {percent:5.1f}%  {human_size(progress.done_bytes)} / "
        f"{human_size(progress.total_bytes)}  {human_size(int(progress.bytes_per_s))}/s  "
        f"ETA {eta_text}"
    )


@contextmanager
def _store(
    config_file: Path | None, *, create: bool
) -> Iterator[tuple[Settings, ModelRegistry | None]]:
    """The settings and the registry; None for the registry when reading and the default
    SQLite database does not exist yet (a read must not create it)."""
    from aicc.db import Database

    try:
        settings = load_settings(config_file)
    except AiccError as exc:
        raise CliError(exc.message) from None
    default_db = settings.state_dir / "aicc.db"
    if not create and settings.database_url is None and not default_db.exists():
        yield settings, None
        return
    try:
        database = Database(settings.resolved_database_url)
        database.migrate()
    except AiccError as exc:
        raise CliError(exc.message) from None
    try:
        yield settings, ModelRegistry(database, settings.model_dir)
    finally:
        database.close()


def _encryption_key(settings: Settings) -> bytes | None:
    if not settings.model_encrypt:
        return None
    from aicc.store.model_keys import load_model_key

    return _call(load_model_key, settings)


P = ParamSpec("P")
T = TypeVar("T")


def _call(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call `function`, turning a domain error into the CLI's error line."""
    try:
        return function(*args, **kwargs)
    except AiccError as exc:
        raise CliError(exc.message) from None
