"""`aicc eval perplexity|compare`: model quality on the user's own text, computed locally."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from aicc.cli.client import CliError
from aicc.cli.output import echo_json, echo_table
from aicc.config import Settings, load_settings
from aicc.errors import AiccError

if TYPE_CHECKING:
    from aicc.store.registry import ModelRegistry

text_option = click.option(
    "--text",
    "text_file",
    required=True,
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="UTF-8 text to score.",
)
window_options = (
    click.option(
        "--ctx",
        type=click.IntRange(2, 1 << 20),
        default=512,
        show_default=True,
        help="Tokens per window.",
    ),
    click.option(
        "--stride",
        type=click.IntRange(1),
        default=256,
        show_default=True,
        help="Tokens the window moves by (each window scores only new tokens).",
    ),
    click.option("--threads", type=click.IntRange(1, 1024), help="[default: all CPUs]"),
    click.option(
        "--config", "config_file", type=click.Path(path_type=Path), help="YAML settings file."
    ),
    click.option("--json", "as_json", is_flag=True, help="Print JSON."),
)


def _window_options(func: Any) -> Any:
    for option in reversed(window_options):
        func = option(func)
    return func


@click.group("eval")
def eval_group() -> None:
    """Measure model quality: perplexity, and the cost of a quantization."""


@eval_group.command("perplexity")
@click.argument("model")
@text_option
@_window_options
def perplexity_command(model: str, text_file: Path, **options: Any) -> None:
    """Perplexity of MODEL (NAME[:TAG] or a GGUF path) on a text."""
    _run([model], text_file, **options)


@eval_group.command("compare")
@click.argument("model_a")
@click.argument("model_b")
@text_option
@_window_options
def compare_command(model_a: str, model_b: str, text_file: Path, **options: Any) -> None:
    """Perplexity of two models on one text, and B's change against A (e.g. a quantization)."""
    _run([model_a, model_b], text_file, **options)


def _run(
    specs: list[str],
    text_file: Path,
    *,
    ctx: int,
    stride: int,
    threads: int | None,
    config_file: Path | None,
    as_json: bool,
) -> None:
    from aicc.eval.compare import HEADERS, compare, table_rows

    if stride >= ctx:
        raise click.BadParameter(f"must be below --ctx ({ctx})", param_hint="--stride")
    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {text_file} as UTF-8 text: {exc}") from None
    try:
        settings = load_settings(config_file)
        with ExitStack() as stack:
            models = [(spec, stack.enter_context(_plaintext(spec, settings))) for spec in specs]
            scores = compare(models, text, ctx=ctx, stride=stride, threads=threads)
    except AiccError as exc:
        raise CliError(exc.message) from None
    if as_json:
        echo_json(
            [
                {
                    "model": score.label,
                    "quantization": score.quantization,
                    "size_bytes": score.size_bytes,
                    "perplexity": score.result.ppl,
                    "tokens": score.result.tokens,
                    "windows": score.result.windows,
                    "change_pct": score.change_pct,
                }
                for score in scores
            ]
        )
        return
    echo_table(HEADERS, table_rows(scores))
    result = scores[0].result
    click.echo(f"{result.tokens} tokens scored in {result.windows} window(s)", err=True)


@contextmanager
def _plaintext(spec: str, settings: Settings) -> Iterator[Path]:
    """The path llama.cpp should open for `spec`; an encrypted model is decrypted into memory.

    Raises ModelNotFoundError, ConfigError (no key), ModelDecryptionError.
    """
    from aicc.store.crypto import is_encrypted, plaintext_paths
    from aicc.store.local import resolve_model
    from aicc.store.model_keys import load_model_key

    with _optional_registry(settings) as registry:
        model = resolve_model(spec, settings.model_dir, registry)
    files = list(model.files) or [model.path]
    encrypted = [path for path in files if is_encrypted(path)]
    if encrypted and len(files) > 1:
        raise CliError(f"{spec} is an encrypted multi-part model; decrypt it to evaluate it")
    key = load_model_key(settings) if encrypted else None
    with plaintext_paths(files[:1], key) as (path,):
        yield path


@contextmanager
def _optional_registry(settings: Settings) -> Iterator[ModelRegistry | None]:
    """The model registry, or None when no state database exists yet (reads never create)."""
    from aicc.db import Database
    from aicc.store.registry import ModelRegistry

    if settings.database_url is None and not (settings.state_dir / "aicc.db").exists():
        yield None
        return
    database = Database(settings.resolved_database_url)
    try:
        database.migrate()
        yield ModelRegistry(database, settings.model_dir)
    finally:
        database.close()
