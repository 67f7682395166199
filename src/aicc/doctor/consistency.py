"""Settings that each pass validation but contradict each other or the machine.

(Contradictions `Settings` itself refuses — tls_cert without tls_key, say — stop loading, and
`aicc doctor` reports them as the `settings` check.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from aicc.audit.entries import load_content_cipher
from aicc.config import Settings
from aicc.doctor.checks import CheckResult, failed, passed, warned
from aicc.doctor.state import is_loopback
from aicc.errors import ConfigError
from aicc.store.model_keys import read_key_file

MIN_SLOT_CONTEXT = 512
"""In deterministic mode one request's context is ctx_size / max_batch_size; below this few
chat requests fit."""

_WILDCARDS = ("0.0.0.0", "::", "")


def consistency_checks(settings: Settings, source: str) -> list[CheckResult]:
    """One result per contradiction found, or one PASS naming where the settings came from."""
    results = [result for rule in _RULES for result in rule(settings)]
    return results or [passed("settings", f"{source}; no contradictions found")]


def _metrics_port(settings: Settings) -> Iterator[CheckResult]:
    if settings.metrics_port is None or settings.metrics_port == 0:
        return
    same_host = settings.metrics_host == settings.host or (
        settings.metrics_host in _WILDCARDS or settings.host in _WILDCARDS
    )
    if settings.metrics_port == settings.port and same_host:
        yield failed(
            "settings: metrics_port",
            f"metrics_port and port are both {settings.port}",
            "choose another metrics_port (the two listeners cannot share a port)",
        )


def _metrics_disabled(settings: Settings) -> Iterator[CheckResult]:
    if settings.metrics_enabled:
        return
    unused = [
        name
        for name, is_set in (
            ("metrics_public", settings.metrics_public),
            ("metrics_port", settings.metrics_port is not None),
        )
        if is_set
    ]
    if unused:
        yield warned(
            "settings: metrics",
            f"{' and '.join(unused)} set, but metrics_enabled is false",
            "set metrics_enabled: true, or drop " + " and ".join(unused),
        )


def _public_metrics(settings: Settings) -> Iterator[CheckResult]:
    if settings.metrics_enabled and settings.metrics_public and not is_loopback(settings.host):
        yield warned(
            "settings: metrics_public",
            f"/metrics is served without a credential on {settings.host}",
            "use metrics_port on an internal address instead, or firewall the port",
        )


def _deterministic_context(settings: Settings) -> Iterator[CheckResult]:
    if not settings.batch_invariant:
        return
    per_slot = settings.ctx_size // settings.max_batch_size
    if per_slot < MIN_SLOT_CONTEXT:
        yield warned(
            "settings: batch_invariant",
            f"each request gets ctx_size / max_batch_size = {per_slot} tokens of context",
            f"raise ctx_size to {MIN_SLOT_CONTEXT * settings.max_batch_size} or lower "
            "max_batch_size",
        )


def _model_key(settings: Settings) -> Iterator[CheckResult]:
    if not settings.model_encrypt:
        return
    if settings.model_key_file is not None:
        try:
            read_key_file(settings.model_key_file)
        except ConfigError as exc:
            yield failed("settings: model_key_file", exc.message, "fix the key file")
        return
    if settings.model_key_command is None and settings.model_key_env not in os.environ:
        yield failed(
            "settings: model_encrypt",
            "model_encrypt is on but no model key is configured",
            f"set model_key_file (mode 0600), model_key_command or {settings.model_key_env}",
        )


def _audit_content(settings: Settings) -> Iterator[CheckResult]:
    if not settings.audit_capture_content:
        return
    if not settings.audit_enabled:
        yield warned(
            "settings: audit_capture_content",
            "audit_capture_content is on, but audit_enabled is false",
            "set audit_enabled: true, or drop audit_capture_content",
        )
        return
    try:
        load_content_cipher(settings)
    except ConfigError as exc:
        yield failed(
            "settings: audit_capture_content",
            exc.message,
            "give the key (64 hex characters) in a mode-0600 file or the environment",
        )


def _shared_database_secret(settings: Settings) -> Iterator[CheckResult]:
    if settings.database_url is None or settings.secret_key is not None:
        return
    if not settings.database_url.startswith("sqlite"):
        yield warned(
            "settings: secret_key",
            "a server database, and secret_key comes from each gateway's state_dir",
            "if several gateways share this database, give them all one secret_key",
        )


_RULES: tuple[Callable[[Settings], Iterator[CheckResult]], ...] = (
    _metrics_port,
    _metrics_disabled,
    _public_metrics,
    _deterministic_context,
    _model_key,
    _audit_content,
    _shared_database_secret,
)
