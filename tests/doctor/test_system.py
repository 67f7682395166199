"""Machine checks: instruction sets against llama.cpp's build, memory, disk, ports."""

from __future__ import annotations

import socket
from pathlib import Path

import llama_cpp

from aicc.doctor.checks import Status
from aicc.doctor.system import (
    CpuInfo,
    cpu_check,
    cpu_features_check,
    disk_check,
    memory_check,
    packages_check,
    port_check,
    python_check,
    read_cpuinfo,
    read_meminfo,
)

AVX2_BUILD = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | REPACK = 1 |"
CPUINFO = """processor\t: 0
model name\t: Example CPU 9000
flags\t\t: fpu sse sse2 avx f16c fma avx2 avx512f avx512_vnni amx_int8

processor\t: 1
model name\t: Example CPU 9000
flags\t\t: fpu
"""


def test_cpuinfo_gives_the_first_processors_model_and_flags() -> None:
    cpu = read_cpuinfo(CPUINFO)
    assert cpu.model_name == "Example CPU 9000"
    assert {"avx2", "avx512f", "amx_int8"} <= cpu.flags
    assert "fpu" in cpu.flags


def test_features_the_build_does_not_use_are_a_warning() -> None:
    result = cpu_features_check(read_cpuinfo(CPUINFO), AVX2_BUILD, "0.3.36")
    assert result.status is Status.WARN
    assert "AMX_INT8, AVX512, AVX512_VNNI, unused" in result.value
    assert "GGML_NATIVE=on" in result.fix
    assert "llama-cpp-python==0.3.36" in result.fix


def test_a_build_for_features_the_cpu_lacks_fails() -> None:
    cpu = CpuInfo("Old CPU", frozenset({"avx", "avx2", "fma", "f16c"}))
    result = cpu_features_check(cpu, AVX2_BUILD + " AVX512 = 1 |", "0.3.36")
    assert result.status is Status.FAIL
    assert "AVX512" in result.value
    assert "illegal instruction" in result.fix


def test_no_avx2_is_a_warning() -> None:
    cpu = CpuInfo("Very old CPU", frozenset({"sse", "sse2", "avx"}))
    result = cpu_features_check(cpu, "CPU : SSE3 = 1 | AVX = 1 |", "0.3.36")
    assert result.status is Status.WARN
    assert result.value.startswith("no AVX2")


def test_matching_features_pass() -> None:
    cpu = CpuInfo("CPU", frozenset({"avx", "avx2", "fma", "f16c"}))
    result = cpu_features_check(cpu, AVX2_BUILD, "0.3.36")
    assert result.status is Status.PASS
    assert result.value == "AVX, AVX2, FMA, F16C (all used by llama.cpp)"


def test_this_machine_against_the_installed_llama_cpp() -> None:
    cpu = read_cpuinfo(Path("/proc/cpuinfo").read_text())
    info = llama_cpp.llama_print_system_info().decode()
    assert cpu_features_check(cpu, info, "0.3.36").status is not Status.FAIL


def test_more_threads_than_cpus_is_a_warning() -> None:
    result = cpu_check(CpuInfo("CPU", frozenset()), threads=4096)
    assert result.status is Status.WARN
    assert "threads=4096" in result.value


def test_python_and_pinned_packages_of_this_environment() -> None:
    assert python_check().status is Status.PASS
    packages = packages_check()
    assert packages.status is not Status.FAIL, packages
    assert "llama-cpp-python" in packages.value


def test_meminfo_is_read_in_bytes() -> None:
    info = read_meminfo("MemTotal:       16384 kB\nMemAvailable:    8192 kB\nHugePages_Total: 0\n")
    assert info == {"MemTotal": 16 * 1024**2, "MemAvailable": 8 * 1024**2, "HugePages_Total": 0}


def test_memory_beyond_the_machine_fails() -> None:
    result = memory_check(1 << 60, "weights 1 EiB")
    assert result.status is Status.FAIL
    assert "ctx_size" in result.fix
    assert memory_check(1024, "a little").status is Status.PASS


def test_disk_too_small_for_the_model_fails(tmp_path: Path) -> None:
    result = disk_check([tmp_path / "not" / "yet"], missing_model_bytes=1 << 60)
    assert result.status is Status.FAIL
    assert str(tmp_path / "not" / "yet") in result.value
    assert disk_check([tmp_path], missing_model_bytes=0).status is not Status.FAIL


def test_port_in_use_fails_unless_it_is_the_server_under_check() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert port_check("port", "127.0.0.1", port).status is Status.FAIL
        ours = port_check("port", "127.0.0.1", port, server_port=port)
        assert ours.status is Status.PASS
        assert "server under check" in ours.value
    assert port_check("port", "127.0.0.1", port).status is Status.PASS


def test_unusable_hosts_fail() -> None:
    foreign = port_check("port", "192.0.2.1", 8080)  # TEST-NET-1: not on this machine
    assert (foreign.status, foreign.value) == (
        Status.FAIL,
        "192.0.2.1 is not an address of this machine",
    )
    assert port_check("port", "127.0.0.1", 0).status is Status.PASS
