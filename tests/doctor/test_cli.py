"""`aicc doctor` end to end (click's runner, in-process) on real configs, files and servers."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result

from aicc.db import Database
from aicc.store.local import BUNDLED_MODEL_NAME
from tests.conftest import LiveServer
from tests.doctor.helpers import (
    checks_by_name,
    days_from_now,
    free_port,
    run_cli,
    table_rows,
    write_cert,
    write_config,
)
from tests.models.tiny_deepseek import write_tiny_deepseek


@pytest.fixture(scope="module")
def good_config(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model, a migrated SQLite database, a free port."""
    root = tmp_path_factory.mktemp("doctor-good")
    Database(f"sqlite:///{root / 'state' / 'aicc.db'}").migrate()
    return write_config(
        root / "aicc.yaml",
        model=BUNDLED_MODEL_NAME,
        model_dir=model_dir,
        state_dir=root / "state",
        port=free_port(),
    )


@pytest.fixture(scope="module")
def good_run(good_config: Path, server: LiveServer) -> Result:
    return run_cli(
        "--config", str(good_config), "--json", "--server", server.base_url,
        "--api-key", server.api_key,
    )  # fmt: skip


def test_good_config_exits_0_with_key_checks_passing(good_run: Result) -> None:
    assert good_run.exit_code == 0, good_run.stdout
    checks = checks_by_name(good_run)
    for name in ("settings", "python", "model", "model load", "port", "database", "tls"):
        assert checks[name]["status"] == "PASS", checks[name]
    assert "sha256 matches" in checks["model integrity"]["value"]
    assert checks["model integrity"]["status"] == "PASS"
    assert "schema at" in checks["database"]["value"]
    assert "clock" not in checks  # --server given: `server: clock` instead


def test_gpu_check_says_cpu_mode_without_a_gpu(good_run: Result) -> None:
    gpu = checks_by_name(good_run)["gpu"]
    if "no GPU" not in gpu["value"]:
        pytest.skip("this machine has a GPU")
    assert gpu["status"] == "PASS"
    assert gpu["value"].startswith("no GPU: CPU mode")


def test_json_output_parses_and_sums_up(good_run: Result) -> None:
    checks = checks_by_name(good_run)
    assert all(set(check) == {"name", "status", "value", "fix"} for check in checks.values())
    assert all(check["fix"] for check in checks.values() if check["status"] in ("WARN", "FAIL"))


def test_server_checks_pass_against_a_live_server(good_run: Result) -> None:
    checks = checks_by_name(good_run)
    for name in ("server: ready", "server: clock", "server: completion", "server: metrics"):
        assert checks[name]["status"] == "PASS", checks[name]
    assert "1 token" in checks["server: completion"]["value"]
    symptoms = [check for name, check in checks.items() if name.startswith("server: ")]
    assert {"server: queue", "server: kv cache", "server: cpu", "server: errors"} <= {
        check["name"] for check in symptoms
    }
    assert all(check["status"] != "FAIL" for check in symptoms)


@pytest.fixture(scope="module")
def held_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory: pytest.TempPathFactory, held_port: int) -> Result:
    """Missing model, expired certificate, unreachable database, port in use, and the
    metrics port on the main port — all at once, each its own FAIL."""
    root = tmp_path_factory.mktemp("doctor-broken")
    cert, key = write_cert(root, not_before=days_from_now(-30), not_after=days_from_now(-1))
    config = write_config(
        root / "aicc.yaml",
        model="no-such-model",
        model_dir=root / "models",
        state_dir=root / "state",
        port=held_port,
        metrics_port=held_port,
        tls_cert=cert,
        tls_key=key,
        database_url=f"postgresql+psycopg://aicc@127.0.0.1:{free_port()}/aicc",
    )
    return run_cli("--config", str(config), "--timeout", "5")


def test_broken_config_exits_1(broken_run: Result) -> None:
    assert broken_run.exit_code == 1
    assert "problems found" in broken_run.stdout
    assert table_rows(broken_run)["clock"][0] == "SKIP"  # no --server: nothing to ask


def test_missing_model_fails_with_the_fix(broken_run: Result) -> None:
    status, value, fix = table_rows(broken_run)["model"]
    assert (status, "no-such-model" in value) == ("FAIL", True)
    assert "aicc models list" in fix


def test_expired_certificate_fails_with_the_fix(broken_run: Result) -> None:
    status, value, fix = table_rows(broken_run)["tls"]
    assert status == "FAIL"
    assert "expired on" in value
    assert "renew" in fix


def test_unreachable_database_fails_with_the_fix(broken_run: Result) -> None:
    status, value, fix = table_rows(broken_run)["database"]
    assert status == "FAIL"
    assert value.startswith("cannot connect to postgresql+psycopg://aicc@127.0.0.1")
    assert "database_url" in fix


def test_port_in_use_fails_with_the_fix(broken_run: Result, held_port: int) -> None:
    status, value, fix = table_rows(broken_run)["port"]
    assert (status, value) == ("FAIL", f"127.0.0.1:{held_port} is in use")
    assert f"sport = :{held_port}" in fix


def test_contradictory_settings_fail_with_the_fix(broken_run: Result, held_port: int) -> None:
    status, value, fix = table_rows(broken_run)["settings: metrics_port"]
    assert (status, value) == ("FAIL", f"metrics_port and port are both {held_port}")
    assert "another metrics_port" in fix


def test_settings_the_loader_refuses_fail_and_skip_the_rest(tmp_path: Path) -> None:
    cert, _ = write_cert(tmp_path, not_before=days_from_now(-1), not_after=days_from_now(90))
    config = write_config(tmp_path / "aicc.yaml", tls_cert=cert, state_dir=tmp_path)
    result = run_cli("--config", str(config), "--json")
    assert result.exit_code == 1
    checks = checks_by_name(result)
    assert checks["settings"]["status"] == "FAIL"
    assert "tls_cert and tls_key must be given together" in checks["settings"]["value"]
    assert str(config) in checks["settings"]["fix"]
    assert checks["model"]["status"] == checks["database"]["status"] == "SKIP"
    assert checks["python"]["status"] == "PASS"


def test_server_on_a_closed_port_fails(tmp_path: Path) -> None:
    write_tiny_deepseek(tmp_path / "tiny.gguf")
    config = write_config(
        tmp_path / "aicc.yaml",
        model="tiny",
        model_dir=tmp_path,
        state_dir=tmp_path / "state",
        port=free_port(),
    )
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli("--config", str(config), "--json", "--server", url, "--timeout", "5")
    assert result.exit_code == 1
    checks = checks_by_name(result)
    failures = {name for name, check in checks.items() if check["status"] == "FAIL"}
    assert failures == {"server: ready"}
    assert checks["server: ready"]["value"] == f"nothing answers at {url}"
    assert "aicc serve" in checks["server: ready"]["fix"]
    assert checks["server: completion"]["status"] == "SKIP"
    assert checks["model load"]["status"] == "PASS"


def test_a_key_without_metrics_read_still_gets_a_completion(
    tmp_path: Path, server: LiveServer
) -> None:
    write_tiny_deepseek(tmp_path / "tiny.gguf")
    config = write_config(
        tmp_path / "aicc.yaml", model="tiny", model_dir=tmp_path, state_dir=tmp_path / "state"
    )
    key = server.create_user_key("doctor-user")
    result = run_cli(
        "--config", str(config), "--json", "--server", server.base_url, "--api-key", key
    )
    checks = checks_by_name(result)
    assert checks["server: completion"]["status"] == "PASS"
    assert checks["server: metrics"]["status"] == "WARN"
    assert "metrics:read" in checks["server: metrics"]["fix"]
    assert checks["server: symptoms"]["status"] == "SKIP"


def test_bad_server_url_is_a_usage_error() -> None:
    result = run_cli("--server", "ftp://example")
    assert result.exit_code == 2
    assert "is not a server URL" in result.stderr
