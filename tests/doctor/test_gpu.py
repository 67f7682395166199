"""GPU checks: the real no-GPU path, and NVML's answers parsed through a stand-in module."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from aicc.doctor.checks import Status
from aicc.doctor.gpu import (
    decode_cudnn_version,
    gpu_checks,
    parse_topology,
    read_nvml,
    topology_check,
)
from aicc.doctor.models import MemoryBudget

GIB = 1024**3

TOPOLOGY = """\x1b[4mGPU0\tGPU1\tGPU2\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m
GPU0\t X \tNV18\tSYS\tPXB\t0-47\t0\t\tN/A
GPU1\tNV18\t X \tSYS\tSYS\t0-47\t0\t\tN/A
GPU2\tSYS\tSYS\t X \tSYS\t48-95\t1\t\tN/A
NIC0\tPXB\tSYS\tSYS\t X

Legend:

  X    = Self
  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes
"""


class FakeNvmlError(Exception):
    pass


@dataclass
class FakeNvml:
    """The part of pynvml that aicc calls, answering for `devices` (name, total, used, util)."""

    devices: list[tuple[str, int, int, int]]
    cuda: int = 12040
    num_shutdowns: int = 0

    NVMLError = FakeNvmlError
    NVML_TEMPERATURE_GPU = 0

    def nvmlInit(self) -> None:
        if not self.devices:
            raise FakeNvmlError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        self.num_shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self.devices[handle][0].encode()

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        _, total, used, _ = self.devices[handle]
        return SimpleNamespace(total=total, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=self.devices[handle][3])

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        raise FakeNvmlError("Not Supported")

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda


def by_name(results: list[Any]) -> dict[str, Any]:
    return {result.name: result for result in results}


def test_without_a_gpu_the_server_runs_in_cpu_mode() -> None:
    results = gpu_checks("cpu", None)
    if results[0].status is not Status.PASS or "no GPU" not in results[0].value:
        pytest.skip("this machine has a GPU")
    assert len(results) == 1
    assert results[0].value.startswith("no GPU: CPU mode")


def test_device_cuda_without_a_gpu_fails() -> None:
    result = gpu_checks("cuda", None, nvml=FakeNvml(devices=[]))[0]
    assert result.status is Status.FAIL
    assert "Driver Not Loaded" in result.value
    assert "device: cpu" in result.fix


def test_nvml_answers_are_read_and_nvml_is_released() -> None:
    nvml = FakeNvml(devices=[("NVIDIA H100", 80 * GIB, 2 * GIB, 7)])
    inventory, why = read_nvml(nvml)
    assert why == ""
    assert inventory is not None
    assert inventory.driver_version == "550.54.15"
    assert inventory.cuda_version == (12, 4)
    assert inventory.names == ("NVIDIA H100",)
    assert inventory.samples[0].memory_total_bytes == 80 * GIB
    assert inventory.samples[0].utilization_ratio == pytest.approx(0.07)
    assert nvml.num_shutdowns == 1


def test_a_gpu_serving_the_model_passes() -> None:
    nvml = FakeNvml(devices=[("NVIDIA H100", 80 * GIB, 2 * GIB, 7)])
    results = by_name(gpu_checks("cuda", MemoryBudget(4 * GIB, GIB), nvml=nvml, llama_gpu=True))
    assert results["gpu"].status is Status.PASS
    assert results["gpu"].value == "1 × NVIDIA H100; driver 550.54.15"
    assert results["cuda"].value == "driver supports CUDA 12.4"
    assert results["gpu memory"].status is Status.PASS
    assert "the model needs ~5.0 GiB" in results["gpu memory"].value


def test_old_cuda_fails() -> None:
    nvml = FakeNvml(devices=[("Tesla T4", 16 * GIB, 0, 0)], cuda=11040)
    result = by_name(gpu_checks("cuda", None, nvml=nvml, llama_gpu=True))["cuda"]
    assert (result.status, result.value) == (Status.FAIL, "driver supports CUDA 11.4")
    assert "11.8" in result.fix


def test_a_model_larger_than_the_gpus_fails() -> None:
    nvml = FakeNvml(devices=[("Tesla T4", 16 * GIB, GIB, 0)])
    budget = MemoryBudget(40 * GIB, 2 * GIB)
    result = by_name(gpu_checks("cuda", budget, nvml=nvml, llama_gpu=True))["gpu memory"]
    assert result.status is Status.FAIL
    assert "ctx_size" in result.fix


def test_cuda_device_with_a_cpu_only_llama_cpp_fails() -> None:
    nvml = FakeNvml(devices=[("Tesla T4", 16 * GIB, 0, 0)])
    result = by_name(gpu_checks("cuda", None, nvml=nvml, llama_gpu=False))["gpu"]
    assert result.status is Status.FAIL
    assert "GGML_CUDA=on" in result.fix


def test_gpus_left_idle_by_device_cpu_are_a_warning() -> None:
    nvml = FakeNvml(devices=[("Tesla T4", 16 * GIB, 0, 0)])
    result = by_name(gpu_checks("cpu", None, nvml=nvml, llama_gpu=True))["gpu"]
    assert result.status is Status.WARN
    assert "device: cuda" in result.fix


def test_topology_pairs_and_link_types() -> None:
    links = parse_topology(TOPOLOGY)
    assert links == {("GPU0", "GPU1"): "NV18", ("GPU0", "GPU2"): "SYS", ("GPU1", "GPU2"): "SYS"}
    result = topology_check(TOPOLOGY)
    assert result.status is Status.WARN
    assert "GPU0-GPU2 traffic crosses CPU sockets" in result.fix


def test_nvlink_topology_passes() -> None:
    text = "\tGPU0\tGPU1\tCPU Affinity\nGPU0\t X \tNV12\t0-31\nGPU1\tNV12\t X \t0-31\n"
    result = topology_check(text)
    assert (result.status, result.value) == (Status.PASS, "GPU0-GPU1 NV12")
    assert topology_check(None).status is Status.SKIP


def test_cudnn_versions_of_both_numbering_schemes() -> None:
    assert decode_cudnn_version(8906) == (8, 9)
    assert decode_cudnn_version(8500) == (8, 5)
    assert decode_cudnn_version(90100) == (9, 1)
