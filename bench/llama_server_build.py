"""Build llama.cpp's `llama-server` from the source vendored in the llama-cpp-python sdist.

The binary goes into a cache directory outside the repository and is reused; it is never
committed. Same llama.cpp commit as the Python bindings aicc uses, so the comparison is fair.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path


def ensure_llama_server(cache_dir: Path) -> Path:
    release = version("llama-cpp-python")
    root = cache_dir / f"llama-cpp-python-{release}"
    binary = root / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    source = root / f"llama_cpp_python-{release}" / "vendor" / "llama.cpp"
    if not source.is_dir():
        sdist = _download_sdist(release, root)
        with tarfile.open(sdist) as archive:
            archive.extractall(root, filter="data")
    print(f"building llama-server {release} in {root} (once; several minutes)", flush=True)
    build = root / "build"
    subprocess.run(
        [
            "cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    subprocess.run(
        ["cmake", "--build", str(build), "--target", "llama-server", "-j"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return binary


def _download_sdist(release: str, into: Path) -> Path:
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={release}", "-d", str(into),
        ],
        check=True,
    )  # fmt: skip
    return next(into.glob("llama_cpp_python-*.tar.gz"))


if __name__ == "__main__":
    print(ensure_llama_server(Path.home() / ".cache" / "aicc" / "llama-server-build"))
