"""GPU readings through NVML (nvidia-ml-py), for the metrics scrape.

On a machine without an NVIDIA driver `GpuReader.open()` returns None and the GPU metrics are
simply absent: a CPU server is a normal deployment, not an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One device's state at one moment; a field is None when the device does not report it."""

    index: int
    utilization_ratio: float | None
    """Fraction of the last sample period in which a kernel ran (0-1)."""
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    temperature_celsius: float | None


class GpuReader:
    """Holds NVML open; `read()` returns one sample per device."""

    def __init__(self, nvml: Any, num_devices: int) -> None:
        self._nvml = nvml
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(num_devices)]

    @classmethod
    def open(cls) -> GpuReader | None:
        """NVML with at least one device, or None (no library, no driver, no device)."""
        try:
            import pynvml  # type: ignore[import-untyped]
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            logger.debug("no GPU metrics: %s", exc)
            return None
        try:
            num_devices = int(pynvml.nvmlDeviceGetCount())
            if num_devices > 0:
                return cls(pynvml, num_devices)
        except pynvml.NVMLError as exc:
            logger.warning("no GPU metrics: NVML failed to list devices: %s", exc)
        pynvml.nvmlShutdown()
        return None

    @property
    def num_devices(self) -> int:
        return len(self._handles)

    def read(self) -> list[GpuSample]:
        return [self._read_one(index, handle) for index, handle in enumerate(self._handles)]

    def close(self) -> None:
        """Release NVML (idempotent)."""
        if self._handles:
            self._handles = []
            self._nvml.nvmlShutdown()

    def _read_one(self, index: int, handle: Any) -> GpuSample:
        nvml = self._nvml
        utilization = self._query(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
        memory = self._query(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        temperature = self._query(
            lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        )
        return GpuSample(
            index=index,
            utilization_ratio=None if utilization is None else float(utilization),
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            temperature_celsius=None if temperature is None else float(temperature),
        )

    def _query(self, call: Callable[[], Any]) -> Any:
        """One reading, or None when this device does not support it (e.g. no temperature
        sensor on some virtual GPUs) or it is momentarily unavailable."""
        try:
            return call()
        except self._nvml.NVMLError as exc:
            logger.debug("NVML reading failed: %s", exc)
            return None


_GAUGES = (
    ("aicc_gpu_utilization_ratio", "Fraction of time a GPU kernel ran.", "utilization_ratio"),
    ("aicc_gpu_memory_used_bytes", "GPU memory in use.", "memory_used_bytes"),
    ("aicc_gpu_memory_total_bytes", "GPU memory in all.", "memory_total_bytes"),
    ("aicc_gpu_temperature_celsius", "GPU core temperature.", "temperature_celsius"),
)


def gpu_metric_families(samples: list[GpuSample]) -> Iterator[GaugeMetricFamily]:
    """One gauge per reading, labelled `gpu` (the NVML index); readings no device reported
    are left out."""
    for name, documentation, field_name in _GAUGES:
        family = GaugeMetricFamily(name, documentation, labels=("gpu",))
        for sample in samples:
            value = getattr(sample, field_name)
            if value is not None:
                family.add_metric([str(sample.index)], value)
        if family.samples:
            yield family
