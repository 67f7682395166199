"""`aicc bench` end to end against a live aicc on loopback, through the click command."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from aicc.cli.bench import bench
from tests.conftest import LiveServer, start_server

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def live(model_dir: Path) -> Iterator[LiveServer]:
    # One thread: on a shared, busy machine llama.cpp's second thread mostly waits for a core,
    # and the run is several times slower than with one.
    server = start_server(model_dir, max_batch_size=4, ctx_size=1024, threads=1)
    yield server
    server.stop()


def invoke(*args: str) -> Result:
    # No stored session may stand in for a missing key: point the credentials file elsewhere.
    return CliRunner(env={"XDG_CONFIG_HOME": "/nonexistent", "AICC_API_KEY": None}).invoke(
        bench, list(args)
    )


def assert_clean_failure(result: Result, exit_code: int) -> None:
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert "Traceback" not in result.output


def test_concurrency_sweep_writes_table_json_and_chart(live: LiveServer, tmp_path: Path) -> None:
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    result = invoke(
        "--base-url", live.base_url + "/v1",
        "--api-key", live.api_key,
        "--num-prompts", "8",
        "--input-len", "8",
        "--output-len", "8",
        "--ignore-eos",
        "--concurrency", "1,4",
        "--goodput", "ttft:60000 e2e:120000",
        "--percentiles", "50,99",
        "--json", str(json_path),
        "--plot", str(plot_path),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].split() == ["c=1", "c=4"]
    assert "Request goodput (req/s)" in result.stdout
    assert "c=4 [########################] 8/8 requests, 0 failed" in result.stderr

    data = json.loads(json_path.read_text())
    assert data["config"]["model"] == "gemma-3-270m-q4_k_m"
    assert data["config"]["endpoint"] == "chat"
    assert [level["concurrency"] for level in data["results"]] == [1, 4]
    for level in data["results"]:
        assert (level["successful_requests"], level["failed_requests"]) == (8, 0)
        assert level["total_output_tokens"] == 64
        assert level["total_input_tokens"] >= 8 * 8
        assert level["output_throughput"] > 0
        assert level["good_requests"] == 8
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(level[metric]) == {"count", "mean", "median", "p50", "p99"}
            assert level[metric]["median"] > 0
        for request in level["requests"]:
            assert request["error"] is None
            assert request["output_tokens"] == 8
            assert 0 < request["ttft_ms"] <= request["e2e_ms"]
            assert len(request["itl_ms"]) >= 1
    png = plot_path.read_bytes()
    assert png.startswith(PNG_MAGIC)
    assert len(png) > 0


def test_completions_from_a_file_at_a_request_rate(live: LiveServer, tmp_path: Path) -> None:
    dataset = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "The sea is", "max_tokens": 3}, {"prompt": "One, two, three,"}]
    dataset.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    json_path = tmp_path / "bench.json"
    result = invoke(
        "--base-url", live.base_url,
        "--api-key", live.api_key,
        "--endpoint", "completions",
        "--dataset", str(dataset),
        "--num-prompts", "3",
        "--output-len", "4",
        "--ignore-eos",
        "--request-rate", "20",
        "--warmup", "0",
        "--json", str(json_path),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    level = json.loads(json_path.read_text())["results"][0]
    assert (level["concurrency"], level["request_rate"]) == (None, 20.0)
    assert [r["output_tokens"] for r in level["requests"]] == [3, 4, 3]
    assert all(r["prompt_tokens"] > 0 for r in level["requests"])


def test_wrong_key_is_a_clear_401(live: LiveServer) -> None:
    result = invoke("--base-url", live.base_url, "--api-key", "aicc-sk-wrong", "--num-prompts", "2")
    assert_clean_failure(result, 1)
    assert "Invalid API key" in result.stderr
    assert "check --api-key / AICC_API_KEY" in result.stderr


def test_unknown_model_fails_at_warm_up(live: LiveServer) -> None:
    args = ["--base-url", live.base_url, "--api-key", live.api_key, "--model", "nope"]
    result = invoke(*args, "--num-prompts", "2")
    assert_clean_failure(result, 1)
    assert "the warm-up request failed: HTTP 404: The model 'nope' does not exist" in result.stderr


def test_closed_port_is_a_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = invoke("--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "2")
    assert_clean_failure(result, 1)
    assert f"no aicc server at http://127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--goodput", "latency:5"], "'latency:5' is not an SLO"),
        (["--concurrency", "1,x"], "'x' is not a positive whole number"),
        (["--concurrency", "0"], "'0' is not a positive whole number"),
        (["--percentiles", "120"], "'120' is not a percentile"),
        (["--request-rate", "0"], "must be positive"),
        (["--base-url", "ftp://x"], "is not a server URL"),
        (["--num-prompts", "0"], "0 is not in the range x>=1"),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert_clean_failure(result, 2)
    assert message in result.stderr


def test_bad_dataset_line_is_named(tmp_path: Path) -> None:
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text('{"prompt": "ok"}\n{"prompt": \n')
    result = invoke("--dataset", str(dataset))
    assert_clean_failure(result, 1)
    assert f"aicc: error: {dataset}:2: not JSON" in result.stderr
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = invoke("--dataset", str(chat), "--endpoint", "completions")
    assert_clean_failure(result, 1)
    assert "use --endpoint chat" in result.stderr
