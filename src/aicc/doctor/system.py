"""This machine: Python and packages, CPU and instruction sets, memory, disk, ports."""

from __future__ import annotations

import errno
import importlib.metadata
import os
import platform
import re
import shutil
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aicc.doctor.checks import CheckResult, failed, human_bytes, passed, skipped, warned

MIN_FREE_DISK_BYTES = 1024**3
"""Below this the audit log and database have little room to grow."""

_REBUILD = (
    "CMAKE_ARGS='-DGGML_NATIVE=on' pip install --force-reinstall --no-cache-dir "
    "llama-cpp-python=={version}"
)
# x86 /proc/cpuinfo flag → the name llama.cpp's `llama_print_system_info()` uses.
_CPU_FEATURES = {
    "avx": "AVX",
    "avx2": "AVX2",
    "fma": "FMA",
    "f16c": "F16C",
    "avx_vnni": "AVX_VNNI",
    "avx512f": "AVX512",
    "avx512vbmi": "AVX512_VBMI",
    "avx512_vnni": "AVX512_VNNI",
    "avx512_bf16": "AVX512_BF16",
    "amx_int8": "AMX_INT8",
}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;]+)\s*(?:;(.*))?$")


@dataclass(frozen=True, slots=True)
class CpuInfo:
    model_name: str
    flags: frozenset[str]
    """x86 feature flags; empty on other architectures."""


def python_check() -> CheckResult:
    version = ".".join(str(part) for part in sys.version_info[:3])
    try:
        wanted = importlib.metadata.metadata("aicc")["Requires-Python"] or ""
    except importlib.metadata.PackageNotFoundError:
        wanted = ""
    match = re.search(r">=\s*(\d+)\.(\d+)", wanted)
    if match and sys.version_info[:2] < (int(match[1]), int(match[2])):
        return failed(
            "python", f"{version} (aicc needs {wanted})", f"install Python {wanted.lstrip('>=')}+"
        )
    return passed("python", f"{version} ({platform.python_implementation()})")


def packages_check() -> CheckResult:
    """Installed versions against the exact pins aicc was built with."""
    try:
        requirements = importlib.metadata.requires("aicc") or []
    except importlib.metadata.PackageNotFoundError:
        return skipped("packages", "aicc is not installed as a package; versions not compared")
    pins = [match for line in requirements if (match := _PIN.match(line.strip()))]
    pins = [match for match in pins if "extra" not in (match[3] or "")]
    missing, different = [], []
    for match in pins:
        name, wanted = match[1], match[2]
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
            continue
        if installed != wanted:
            different.append(f"{name} {installed} (pinned {wanted})")
    if missing:
        return failed(
            "packages", f"missing: {', '.join(missing)}", "reinstall aicc: pip install aicc"
        )
    if different:
        return warned(
            "packages",
            "; ".join(different),
            "install the pinned versions (pip install aicc) unless you chose these on purpose",
        )
    llama = _installed("llama-cpp-python")
    return passed("packages", f"{len(pins)} pinned packages as required (llama-cpp-python {llama})")


def read_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags from /proc/cpuinfo text."""
    model_name, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model_name:
            model_name = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model_name or platform.processor() or platform.machine(), flags)


def cpu_check(cpu: CpuInfo, threads: int | None) -> CheckResult:
    """Model and CPU count; WARN when `threads` asks for more CPUs than this process may use."""
    num_available = len(os.sched_getaffinity(0))
    value = f"{cpu.model_name}; {num_available} CPUs available of {os.cpu_count()}"
    if threads is not None:
        value += f"; threads={threads}"
        if threads > num_available:
            return warned(
                "cpu",
                value,
                f"set threads to at most {num_available}: more threads than CPUs makes "
                "llama.cpp's threads wait for each other",
            )
    return passed("cpu", value)


def cpu_features_check(cpu: CpuInfo, llama_info: str, llama_version: str) -> CheckResult:
    """The CPU's instruction sets against those llama.cpp was built to use (its system info,
    e.g. `CPU : SSE3 = 1 | AVX2 = 1 | ...`)."""
    built = set(re.findall(r"\b([A-Z0-9_]+) = 1\b", llama_info))
    if not cpu.flags:
        shown = ", ".join(sorted(built)) or "none reported"
        return passed("cpu features", f"{platform.machine()}; llama.cpp uses {shown}")
    has = {name for flag, name in _CPU_FEATURES.items() if flag in cpu.flags}
    known = set(_CPU_FEATURES.values())
    foreign = sorted((built & known) - has)
    unused = sorted(has - built)
    used = [name for name in _CPU_FEATURES.values() if name in has and name in built]
    rebuild = _REBUILD.format(version=llama_version)
    if foreign:
        return failed(
            "cpu features",
            f"llama.cpp was built for {', '.join(foreign)}, which this CPU lacks",
            f"it will stop with an illegal instruction; rebuild on this machine: {rebuild}",
        )
    if "AVX2" not in has:
        return warned(
            "cpu features",
            f"no AVX2 (has {', '.join(used) or 'none'})",
            "decoding is several times slower without AVX2: use a newer CPU or a GPU",
        )
    if unused:
        return warned(
            "cpu features",
            f"uses {', '.join(used)}; the CPU also has {', '.join(unused)}, unused",
            f"rebuild llama.cpp for this CPU: {rebuild}",
        )
    return passed("cpu features", f"{', '.join(used)} (all used by llama.cpp)")


def read_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes by field name."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def memory_check(need_bytes: int | None, need_detail: str) -> CheckResult:
    """RAM (and a cgroup v2 limit) against what the configured model needs."""
    info = read_meminfo(_read_text(Path("/proc/meminfo")))
    if "MemTotal" not in info:
        return skipped("memory", "/proc/meminfo is not readable here")
    total = info["MemTotal"]
    limit = _cgroup_memory_limit()
    if limit is not None and limit < total:
        total = limit
    available = min(info.get("MemAvailable", total), total)
    value = f"{human_bytes(available)} available of {human_bytes(total)}"
    if limit is not None:
        value += " (container limit)"
    if need_bytes is None:
        return passed("memory", value)
    value += f"; needs ~{human_bytes(need_bytes)} ({need_detail})"
    if need_bytes > total:
        return failed(
            "memory",
            value,
            "lower ctx_size or max_batch_size, choose a smaller or more quantized model, or "
            "add memory",
        )
    if need_bytes > available:
        return warned("memory", value, "free memory (other processes hold it) or lower ctx_size")
    return passed("memory", value)


def disk_check(directories: Sequence[Path], missing_model_bytes: int) -> CheckResult:
    """Free space where models and state live; `missing_model_bytes` must still be written."""
    lowest: tuple[int, Path] | None = None
    for directory in directories:
        existing = _existing_ancestor(directory)
        try:
            free = shutil.disk_usage(existing).free
        except OSError as exc:
            return failed("disk", f"{directory}: {exc.strerror}", "check the path and its mount")
        if lowest is None or free < lowest[0]:
            lowest = (free, directory)
    if lowest is None:
        return skipped("disk", "no directories to check")
    free, where = lowest
    value = f"{human_bytes(free)} free at {where}"
    if missing_model_bytes:
        value += f"; the model still needs {human_bytes(missing_model_bytes)}"
    if free < missing_model_bytes:
        return failed("disk", value, f"free space at {where} or set model_dir elsewhere")
    if free - missing_model_bytes < MIN_FREE_DISK_BYTES:
        return warned("disk", value, "keep at least 1 GiB free: the database and audit log grow")
    return passed("disk", value)


def port_check(name: str, host: str, port: int, *, server_port: int | None = None) -> CheckResult:
    """Whether `host:port` can be bound now. `server_port`: the port of the server under check
    (`--server`), which is expected to be in use."""
    if port == 0:
        return passed(name, f"{host}:0 (any free port)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        return failed(name, f"host {host!r}: {exc.strerror}", "set host to an address or name")
    with socket.socket(family, kind, proto) as sock:
        # As uvicorn binds: connections in TIME_WAIT do not block a restart.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return _bind_failure(name, host, port, exc, server_port)
    return passed(name, f"{host}:{port} is free")


def _bind_failure(
    name: str, host: str, port: int, exc: OSError, server_port: int | None
) -> CheckResult:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        if port == server_port:
            return passed(name, f"{where} is in use, by the server under check (--server)")
        return failed(
            name,
            f"{where} is in use",
            f"stop the process holding it (ss -ltnp 'sport = :{port}') or choose another port",
        )
    if exc.errno == errno.EACCES:
        return failed(
            name,
            f"{where}: permission denied",
            "ports below 1024 need CAP_NET_BIND_SERVICE: use a higher port behind a proxy",
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return failed(name, f"{host} is not an address of this machine", "fix host")
    return failed(name, f"{where}: {exc.strerror}", "choose another host or port")


def _installed(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _cgroup_memory_limit() -> int | None:
    text = _read_text(Path("/sys/fs/cgroup/memory.max")).strip()
    return int(text) if text.isdigit() else None


def _existing_ancestor(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
