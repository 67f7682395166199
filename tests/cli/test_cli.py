"""The `aicc` command as a user runs it: a real process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import llama_cpp
import pytest

from aicc.store.local import BUNDLED_MODEL_NAME


def aicc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aicc", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_invalid_flag_value_stops_with_the_value_named() -> None:
    result = aicc("serve", "--max-batch-size", "0")
    assert result.returncode == 2
    assert "max_batch_size=0" in result.stderr


def test_invalid_env_value_stops_start_up() -> None:
    result = aicc("serve", env={"AICC_CTX_SIZE": "12"})
    assert result.returncode == 2
    assert "ctx_size=12" in result.stderr


def test_unknown_model_is_reported(tmp_path: Path) -> None:
    result = aicc("serve", "--model", "no-such-model", env={"AICC_MODEL_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "no-such-model" in result.stderr


@pytest.mark.skipif(llama_cpp.llama_supports_gpu_offload(), reason="this build can use a GPU")
def test_cuda_on_a_cpu_only_build_says_what_to_do(model_dir: Path) -> None:
    gguf = model_dir / f"{BUNDLED_MODEL_NAME}.gguf"
    result = aicc("serve", "--model-path", str(gguf), "--device", "cuda", "--port", "0")
    assert result.returncode == 2
    assert "GGML_CUDA=on" in result.stderr


def test_config_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "mine.gguf").write_bytes(b"GGUF")
    config = tmp_path / "aicc.yaml"
    config.write_text(f"model_dir: {tmp_path}\n")
    result = aicc("models", "list", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "mine" in result.stdout
    config.write_text("max_batch_size: -3\n")
    result = aicc("serve", "--config", str(config))
    assert result.returncode == 2
    assert "max_batch_size=-3" in result.stderr


def test_models_list_shows_bundled_and_model_dir(model_dir: Path) -> None:
    result = aicc("models", "list", env={"AICC_MODEL_DIR": str(model_dir)})
    assert result.returncode == 0, result.stderr
    assert BUNDLED_MODEL_NAME in result.stdout
    assert "bundled" in result.stdout


def test_serve_prints_url_and_examples_and_answers(model_dir: Path, tmp_path: Path) -> None:
    gguf = model_dir / f"{BUNDLED_MODEL_NAME}.gguf"
    env = {k: v for k, v in os.environ.items() if k != "AICC_ADMIN_KEY"}
    process = subprocess.Popen(
        [
            sys.executable, "-m", "aicc", "serve", "--model-path", str(gguf), "--port", "0",
            "--max-batch-size", "2", "--ctx-size", "1024", "--device", "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**env, "AICC_STATE_DIR": str(tmp_path / "state")},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        banner = ""
        deadline = time.monotonic() + 120
        while "python -c" not in banner and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            banner += line
        match = re.search(r"http://127\.0\.0\.1:(\d+)", banner)
        assert match, banner
        assert "curl http://127.0.0.1:" in banner
        url = match.group(0)
        # An empty database: the first admin's key is printed once, and the API needs it.
        key = re.search(r"aicc-sk-[A-Za-z0-9_-]{43}", banner)
        assert key, banner
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        headers = {"Authorization": f"Bearer {key.group(0)}"}
        models = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()
        assert models["data"][0]["id"] == BUNDLED_MODEL_NAME
        ready = httpx.get(url + "/readyz", timeout=10)
        assert ready.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal: -SIGTERM is a clean stop.
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        if process.stdout is not None:
            process.stdout.close()
