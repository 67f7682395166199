"""The catalog of aliases and the memory check."""

from __future__ import annotations

from pathlib import Path

import pytest

from aicc.errors import InvalidRequestError
from aicc.store.catalog import CATALOG, GIB, find_entry, memory_warning, total_memory_bytes


def test_required_aliases_exist() -> None:
    aliases = {entry.alias for entry in CATALOG}
    for size in ("1.5b", "7b", "8b", "14b", "32b", "70b"):
        assert f"deepseek-r1:{size}" in aliases
    assert {"deepseek-v3", "deepseek-r1", "deepseek-coder-v2-lite", "qwen2.5:7b"} <= aliases
    for entry in CATALOG:
        assert entry.quantizations[0] == "Q4_K_M"
        assert entry.min_memory_bytes() > entry.size_bytes() > 0


def test_files_match_single_and_multi_part() -> None:
    r1 = find_entry("deepseek-r1:7b")
    assert r1 is not None
    assert r1.matches("DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf")
    assert not r1.matches("DeepSeek-R1-Distill-Qwen-7B-Q8_0.gguf")
    assert r1.matches("DeepSeek-R1-Distill-Qwen-7B-Q8_0.gguf", "Q8_0")
    big = find_entry("deepseek-r1")
    assert big is not None
    assert big is find_entry("deepseek-r1:latest")
    assert big.matches("DeepSeek-R1-Q4_K_M/DeepSeek-R1-Q4_K_M-00003-of-00009.gguf")
    assert not big.matches("DeepSeek-R1-Q4_K_M-00003-of-00009.gguf")
    with pytest.raises(InvalidRequestError, match="known: Q4_K_M"):
        big.size_bytes("Q3_X")
    assert find_entry("nope:1b") is None


def test_memory_warning(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8000000 kB\nMemFree:        1000 kB\n")
    assert total_memory_bytes(meminfo) == 8_000_000 * 1024
    small, large = find_entry("qwen2.5:0.5b"), find_entry("deepseek-r1:70b")
    assert small is not None
    assert large is not None
    assert memory_warning(small, meminfo=meminfo) is None
    warning = memory_warning(large, meminfo=meminfo)
    assert warning is not None
    assert "needs about" in warning
    assert "8 GiB" in warning
    assert memory_warning(large, meminfo=tmp_path / "missing") is None
    assert large.min_memory_bytes() > 40 * GIB
