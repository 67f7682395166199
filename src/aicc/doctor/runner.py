"""Run every check in a fixed order: machine, settings and state, then the server if given."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from aicc.config import Settings, load_settings
from aicc.doctor.checks import CheckResult, failed, skipped
from aicc.doctor.consistency import consistency_checks
from aicc.doctor.gpu import gpu_checks
from aicc.doctor.models import ModelFacts, model_checks
from aicc.doctor.server import ServerTarget, server_checks
from aicc.doctor.state import database_check, ldap_check, tls_check
from aicc.doctor.system import (
    cpu_check,
    cpu_features_check,
    disk_check,
    memory_check,
    packages_check,
    port_check,
    python_check,
    read_cpuinfo,
)
from aicc.errors import ConfigError

_SETTINGS_CHECKS = ("memory", "disk", "port", "model", "tls", "database", "ldap")


@dataclass(frozen=True, slots=True)
class DoctorOptions:
    config_file: Path | None = None
    """YAML settings file; else `AICC_CONFIG`, the AICC_* environment and the defaults."""
    server: ServerTarget | None = None
    """Also check this running server."""
    timeout_s: float = 10.0
    """For the database connection (the server's own timeout is in `server`)."""


def run_doctor(options: DoctorOptions) -> list[CheckResult]:
    """Every check's result; never raises for a bad setting or an unreachable service."""
    results: list[CheckResult] = []
    try:
        settings: Settings | None = load_settings(options.config_file)
    except ConfigError as exc:
        settings = None
        where = f"{options.config_file}" if options.config_file else "the AICC_* environment"
        results.append(failed("settings", exc.message, f"correct it in {where}"))
    results += [python_check(), packages_check()]
    results += _cpu_checks(settings)
    if settings is None:
        results += gpu_checks("cpu", None)
        results += [skipped(name, "the settings did not load") for name in _SETTINGS_CHECKS]
    else:
        results += _settings_checks(settings, options)
    if options.server is None:
        results.append(skipped("clock", "no --server to compare with (doctor contacts nothing)"))
    else:
        results += server_checks(options.server, settings)
    return results


def _cpu_checks(settings: Settings | None) -> list[CheckResult]:
    import llama_cpp

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    cpu = read_cpuinfo(cpuinfo)
    raw = llama_cpp.llama_print_system_info()
    info = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    version = importlib.metadata.version("llama-cpp-python")
    return [
        cpu_check(cpu, settings.threads if settings else None),
        cpu_features_check(cpu, info, version),
    ]


def _settings_checks(settings: Settings, options: DoctorOptions) -> list[CheckResult]:
    model_results, facts = model_checks(settings)
    budget = facts.budget(settings) if facts else None
    results: list[CheckResult] = []
    if budget is None:
        results.append(memory_check(None, ""))
    elif settings.device == "cuda":
        results.append(memory_check(budget.runtime, "runtime; weights and KV cache on the GPU"))
    else:
        results.append(memory_check(budget.total, budget.describe()))
    results.append(disk_check([settings.model_dir, settings.state_dir], _missing_bytes(facts)))
    results += gpu_checks(settings.device, budget)
    server_port = _server_port(options.server)
    results.append(port_check("port", settings.host, settings.port, server_port=server_port))
    if settings.metrics_enabled and settings.metrics_port is not None:
        results.append(
            port_check(
                "metrics port",
                settings.metrics_host,
                settings.metrics_port,
                server_port=server_port,
            )
        )
    results += model_results
    results.append(tls_check(settings))
    results.append(database_check(settings, options.timeout_s))
    results.append(ldap_check(settings.ldap))
    source = f"loaded from {options.config_file}" if options.config_file else "loaded"
    results += consistency_checks(settings, source)
    return results


def _missing_bytes(facts: ModelFacts | None) -> int:
    return facts.size_bytes if facts is not None and not facts.is_present else 0


def _server_port(target: ServerTarget | None) -> int | None:
    if target is None:
        return None
    try:
        parts = urlsplit(target.url)
        return parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
