"""NVIDIA GPUs: driver and CUDA version, cuDNN, memory against the model, `nvidia-smi topo -m`
links; or the note that the server runs in CPU mode."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from aicc.doctor.checks import CheckResult, failed, human_bytes, passed, skipped, warned
from aicc.doctor.models import MemoryBudget
from aicc.observability.gpu import GpuReader, GpuSample

MIN_CUDA = (11, 8)
MIN_CUDNN = (8, 6)
BUSY_RATIO = 0.95
TOPOLOGY_TIMEOUT_S = 10.0

_CUDA_REBUILD = (
    "CMAKE_ARGS='-DGGML_CUDA=on' pip install --force-reinstall --no-cache-dir "
    "llama-cpp-python=={version}"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SLOW_LINKS = {"SYS": "crosses CPU sockets", "NODE": "crosses PCIe host bridges in a NUMA node"}


@dataclass(frozen=True, slots=True)
class GpuInventory:
    """What NVML reports about this machine's GPUs."""

    driver_version: str
    cuda_version: tuple[int, int] | None
    """The newest CUDA the driver supports."""
    names: tuple[str, ...]
    samples: tuple[GpuSample, ...]
    """Memory and utilisation, one per device, in NVML index order."""


def read_nvml(nvml: Any | None = None) -> tuple[GpuInventory | None, str]:
    """The GPUs NVML sees, or None and why not. `nvml`: the `pynvml` module (or a stand-in)."""
    if nvml is None:
        try:
            import pynvml  # type: ignore[import-untyped]
        except ImportError:
            return None, "nvidia-ml-py is not installed"
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return None, f"NVML: {exc}"
    reader: GpuReader | None = None
    try:
        num_devices = int(nvml.nvmlDeviceGetCount())
        if num_devices == 0:
            return None, "NVML sees no devices"
        reader = GpuReader(nvml, num_devices)
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(num_devices)]
        cuda = int(nvml.nvmlSystemGetCudaDriverVersion())
        return GpuInventory(
            driver_version=_text(nvml.nvmlSystemGetDriverVersion()),
            cuda_version=(cuda // 1000, cuda % 1000 // 10) if cuda > 0 else None,
            names=tuple(_text(nvml.nvmlDeviceGetName(handle)) for handle in handles),
            samples=tuple(reader.read()),
        ), ""
    except nvml.NVMLError as exc:
        return None, f"NVML: {exc}"
    finally:
        if reader is not None:
            reader.close()
        else:
            nvml.nvmlShutdown()


def parse_topology(text: str) -> dict[tuple[str, str], str]:
    """GPU pair → link type (`NV12`, `PIX`, `PXB`, `PHB`, `NODE`, `SYS`) from
    `nvidia-smi topo -m`; NICs and affinity columns are left out."""
    lines = [_ANSI.sub("", line).split() for line in text.splitlines()]
    # The header names the columns (GPU0 GPU1 … CPU Affinity); rows start with their GPU.
    header = next((t for t in lines if t and t[0] == "GPU0" and "X" not in t), None)
    if header is None:
        return {}
    columns = []
    for token in header:
        if not re.fullmatch(r"(GPU|NIC)\d+", token):
            break
        columns.append(token)
    links: dict[tuple[str, str], str] = {}
    for tokens in lines:
        if not tokens or not re.fullmatch(r"GPU\d+", tokens[0]):
            continue
        for column, link in zip(columns, tokens[1 : 1 + len(columns)], strict=False):
            if column.startswith("GPU") and column != tokens[0]:
                pair = (min(tokens[0], column), max(tokens[0], column))
                links[pair] = link
    return links


def decode_cudnn_version(raw: int) -> tuple[int, int]:
    """cudnnGetVersion(): 8906 → (8, 9) before cuDNN 9, 90100 → (9, 1) from it."""
    if raw >= 10000:
        return raw // 10000, raw % 10000 // 100
    return raw // 1000, raw % 1000 // 100


def find_cudnn() -> tuple[tuple[int, int] | None, str]:
    """The cuDNN version and where it was found (a pip wheel or the system library)."""
    for package in ("nvidia-cudnn-cu12", "nvidia-cudnn-cu11"):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        major, minor = (int(part) for part in version.split(".")[:2])
        return (major, minor), package
    name = ctypes.util.find_library("cudnn")
    if name is None:
        return None, ""
    try:
        library = ctypes.CDLL(name)
        library.cudnnGetVersion.restype = ctypes.c_size_t
        return decode_cudnn_version(int(library.cudnnGetVersion())), name
    except (OSError, AttributeError):
        return None, ""


def read_topology() -> str | None:
    """`nvidia-smi topo -m` output, or None when nvidia-smi is missing or fails."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        done = subprocess.run(
            [binary, "topo", "-m"],
            capture_output=True,
            text=True,
            timeout=TOPOLOGY_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def gpu_checks(
    device: str,
    budget: MemoryBudget | None,
    *,
    nvml: Any | None = None,
    llama_gpu: bool | None = None,
) -> list[CheckResult]:
    """Everything about GPUs; one PASS "no GPU: CPU mode" on a machine without any."""
    import llama_cpp

    inventory, why = read_nvml(nvml)
    if llama_gpu is None:
        llama_gpu = bool(llama_cpp.llama_supports_gpu_offload())
    version = importlib.metadata.version("llama-cpp-python")
    if inventory is None:
        if device == "cuda":
            fix = "install the NVIDIA driver (and check the device is passed to the container), "
            return [failed("gpu", f"device: cuda, but no GPU: {why}", fix + "or set device: cpu")]
        return [passed("gpu", f"no GPU: CPU mode ({why})")]
    checks = [_inventory_check(device, inventory, llama_gpu, version)]
    checks.append(_cuda_check(inventory))
    checks.append(_cudnn_check(*find_cudnn()))
    checks.append(_gpu_memory_check(device, budget, inventory))
    if len(inventory.names) > 1:
        checks.append(topology_check(read_topology()))
    return checks


def topology_check(text: str | None) -> CheckResult:
    if text is None:
        return skipped("gpu topology", "nvidia-smi topo -m is not available")
    links = parse_topology(text)
    if not links:
        return skipped("gpu topology", "nvidia-smi topo -m printed no GPU links")
    value = ", ".join(f"{a}-{b} {link}" for (a, b), link in sorted(links.items()))
    slow = [(pair, link) for pair, link in sorted(links.items()) if link in _SLOW_LINKS]
    if slow:
        (a, b), link = slow[0]
        return warned(
            "gpu topology",
            value,
            f"{a}-{b} traffic {_SLOW_LINKS[link]}: keep one model's shards on GPUs linked by "
            "NVLink or one PCIe switch (CUDA_VISIBLE_DEVICES)",
        )
    return passed("gpu topology", value)


def _inventory_check(
    device: str, inventory: GpuInventory, llama_gpu: bool, version: str
) -> CheckResult:
    value = f"{len(inventory.names)} × {', '.join(sorted(set(inventory.names)))}; "
    value += f"driver {inventory.driver_version}"
    if device == "cuda" and not llama_gpu:
        value += "; llama-cpp-python is built without CUDA"
        return failed("gpu", value, _CUDA_REBUILD.format(version=version))
    if device == "cpu":
        return warned(
            "gpu",
            value + "; device: cpu leaves them unused",
            "set device: cuda to run the model on the GPU"
            + ("" if llama_gpu else f" (after {_CUDA_REBUILD.format(version=version)})"),
        )
    return passed("gpu", value)


def _cuda_check(inventory: GpuInventory) -> CheckResult:
    if inventory.cuda_version is None:
        return skipped("cuda", "the driver does not report its CUDA version")
    major, minor = inventory.cuda_version
    value = f"driver supports CUDA {major}.{minor}"
    if inventory.cuda_version < MIN_CUDA:
        return failed(
            "cuda",
            value,
            f"aicc's CUDA builds need CUDA {MIN_CUDA[0]}.{MIN_CUDA[1]}+: upgrade the NVIDIA driver",
        )
    return passed("cuda", value)


def _cudnn_check(version: tuple[int, int] | None, where: str) -> CheckResult:
    if version is None:
        return skipped("cudnn", "not found (only the vLLM engine uses cuDNN; llama.cpp does not)")
    value = f"{version[0]}.{version[1]} ({where})"
    if version < MIN_CUDNN:
        return warned("cudnn", value, "vLLM needs cuDNN 8.6+: upgrade it (pip or the CUDA image)")
    return passed("cudnn", value)


def _gpu_memory_check(
    device: str, budget: MemoryBudget | None, inventory: GpuInventory
) -> CheckResult:
    total = sum(s.memory_total_bytes or 0 for s in inventory.samples)
    used = sum(s.memory_used_bytes or 0 for s in inventory.samples)
    busiest = max((s.utilization_ratio or 0.0 for s in inventory.samples), default=0.0)
    value = f"{human_bytes(total - used)} free of {human_bytes(total)}; busiest {busiest:.0%}"
    if device == "cuda" and budget is not None:
        need = budget.weights + budget.kv_cache
        value += f"; the model needs ~{human_bytes(need)}"
        fix = "lower ctx_size or max_batch_size, or choose a smaller or more quantized model"
        if need > total:
            return failed("gpu memory", value, fix)
        if need > total - used:
            return warned("gpu memory", value, "free GPU memory (nvidia-smi shows who holds it)")
    if busiest >= BUSY_RATIO:
        return warned(
            "gpu memory",
            value,
            "a GPU is saturated: nvidia-smi shows which processes use it",
        )
    return passed("gpu memory", value)


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
