"""Aliases for well-known GGUF models (`aicc models pull deepseek-r1:7b`): repository, files per
quantization, sizes, and the memory each needs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from aicc.errors import InvalidRequestError

DEFAULT_QUANT = "Q4_K_M"
GIB = 1 << 30
MEMINFO = Path("/proc/meminfo")

_OVERHEAD_BYTES = 1 * GIB
"""Runtime, KV cache and buffers at a modest context, on top of the weights."""


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    alias: str
    """What `pull` takes, ``name[:tag]``."""
    repo: str
    stem: str
    """Path of the file without ``.gguf``, with ``{quant}``; a multi-part file adds
    ``-00001-of-0000N``. May include a folder."""
    sizes_gib: tuple[tuple[str, float], ...]
    """(quantization, size of all parts in GiB), the default first."""
    description: str

    @property
    def quantizations(self) -> tuple[str, ...]:
        return tuple(quant for quant, _ in self.sizes_gib)

    def size_bytes(self, quant: str = DEFAULT_QUANT) -> int:
        return int(dict(self.sizes_gib)[self._known(quant)] * GIB)

    def min_memory_bytes(self, quant: str = DEFAULT_QUANT) -> int:
        """Weights plus ~10 % and 1 GiB for the runtime and a modest KV cache."""
        return int(self.size_bytes(quant) * 1.1) + _OVERHEAD_BYTES

    def file_stem(self, quant: str = DEFAULT_QUANT) -> str:
        return self.stem.format(quant=self._known(quant))

    def matches(self, path: str, quant: str = DEFAULT_QUANT) -> bool:
        """Is `path` (in the repository) this entry's file, or one part of it?"""
        stem = re.escape(self.file_stem(quant))
        return re.fullmatch(rf"{stem}(-\d{{5}}-of-\d{{5}})?\.gguf", path) is not None

    def _known(self, quant: str) -> str:
        if quant not in self.quantizations:
            raise InvalidRequestError(
                f"{self.alias} has no {quant!r} file here; known: {', '.join(self.quantizations)}"
            )
        return quant


def _distill(alias: str, base: str, sizes: tuple[float, float, float], what: str) -> CatalogEntry:
    return CatalogEntry(
        alias,
        f"bartowski/{base}-GGUF",
        f"{base}-{{quant}}",
        (("Q4_K_M", sizes[0]), ("Q5_K_M", sizes[1]), ("Q8_0", sizes[2])),
        what,
    )


CATALOG: tuple[CatalogEntry, ...] = (
    _distill("deepseek-r1:1.5b", "DeepSeek-R1-Distill-Qwen-1.5B", (1.04, 1.19, 1.76),
             "DeepSeek-R1 distilled into Qwen2.5 1.5B"),
    _distill("deepseek-r1:7b", "DeepSeek-R1-Distill-Qwen-7B", (4.36, 5.07, 7.54),
             "DeepSeek-R1 distilled into Qwen2.5 7B"),
    _distill("deepseek-r1:8b", "DeepSeek-R1-Distill-Llama-8B", (4.58, 5.33, 7.95),
             "DeepSeek-R1 distilled into Llama 3.1 8B"),
    _distill("deepseek-r1:14b", "DeepSeek-R1-Distill-Qwen-14B", (8.37, 9.78, 14.62),
             "DeepSeek-R1 distilled into Qwen2.5 14B"),
    _distill("deepseek-r1:32b", "DeepSeek-R1-Distill-Qwen-32B", (18.49, 21.66, 32.43),
             "DeepSeek-R1 distilled into Qwen2.5 32B"),
    _distill("deepseek-r1:70b", "DeepSeek-R1-Distill-Llama-70B", (39.60, 46.52, 69.83),
             "DeepSeek-R1 distilled into Llama 3.3 70B"),
    CatalogEntry("deepseek-r1", "unsloth/DeepSeek-R1-GGUF",
                 "DeepSeek-R1-{quant}/DeepSeek-R1-{quant}",
                 (("Q4_K_M", 376.7), ("Q2_K", 227.6), ("Q8_0", 664.3)),
                 "DeepSeek-R1 671B MoE (multi-part)"),
    CatalogEntry("deepseek-v3", "unsloth/DeepSeek-V3-GGUF",
                 "DeepSeek-V3-{quant}/DeepSeek-V3-{quant}",
                 (("Q4_K_M", 376.7), ("Q2_K", 227.6), ("Q8_0", 664.3)),
                 "DeepSeek-V3 671B MoE (multi-part)"),
    _distill("deepseek-coder-v2-lite", "DeepSeek-Coder-V2-Lite-Instruct", (9.65, 11.04, 15.56),
             "DeepSeek-Coder-V2-Lite 16B MoE (2.4B active)"),
    _distill("qwen2.5:0.5b", "Qwen2.5-0.5B-Instruct", (0.37, 0.39, 0.49), "Qwen2.5 0.5B Instruct"),
    _distill("qwen2.5:1.5b", "Qwen2.5-1.5B-Instruct", (0.92, 1.05, 1.53), "Qwen2.5 1.5B Instruct"),
    _distill("qwen2.5:3b", "Qwen2.5-3B-Instruct", (1.80, 2.07, 3.06), "Qwen2.5 3B Instruct"),
    _distill("qwen2.5:7b", "Qwen2.5-7B-Instruct", (4.36, 5.07, 7.54), "Qwen2.5 7B Instruct"),
    _distill("qwen2.5:14b", "Qwen2.5-14B-Instruct", (8.37, 9.78, 14.62), "Qwen2.5 14B Instruct"),
    _distill("qwen2.5:32b", "Qwen2.5-32B-Instruct", (18.49, 21.66, 32.43), "Qwen2.5 32B Instruct"),
    _distill("qwen2.5:72b", "Qwen2.5-72B-Instruct", (44.16, 50.70, 71.96), "Qwen2.5 72B Instruct"),
    _distill("qwen2.5-coder:7b", "Qwen2.5-Coder-7B-Instruct", (4.36, 5.07, 7.54),
             "Qwen2.5 Coder 7B Instruct"),
)  # fmt: skip
"""Sizes are approximate (GiB, all parts); `pull` verifies the files against the repository."""


def find_entry(alias: str) -> CatalogEntry | None:
    """The entry for `alias`; a bare name means its ``latest`` tag or its only entry."""
    for entry in CATALOG:
        if entry.alias == alias or entry.alias == alias.removesuffix(":latest"):
            return entry
    return None


def total_memory_bytes(meminfo: Path = MEMINFO) -> int | None:
    """MemTotal from /proc/meminfo, or None where it cannot be read (not Linux)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_warning(
    entry: CatalogEntry, quant: str = DEFAULT_QUANT, *, meminfo: Path = MEMINFO
) -> str | None:
    """A warning when this machine has less memory than the model needs, else None."""
    total = total_memory_bytes(meminfo)
    needed = entry.min_memory_bytes(quant)
    if total is None or total >= needed:
        return None
    return (
        f"{entry.alias} ({quant}) needs about {needed / GIB:.0f} GiB of memory; this machine "
        f"has {total / GIB:.0f} GiB. It may not load, or run from swap; try a smaller model "
        "or quantization."
    )
