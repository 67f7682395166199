"""`aicc models` through click's runner, on a real state database and model directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from aicc.cli.main import main
from aicc.store.local import BUNDLED_MODEL_NAME
from tests.models.tiny_deepseek import write_tiny_deepseek


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_deepseek(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        "AICC_MODEL_DIR": str(tmp_path / "models"),
        "AICC_STATE_DIR": str(tmp_path / "state"),
        "AICC_CONFIG": "",
    }


def run(env: dict[str, str], *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, ["models", *args], env=env, input=stdin)


def test_list_before_any_database_creates_none(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "bare.gguf").write_bytes(b"GGUF")
    result = run(env, "list")
    assert result.exit_code == 0, result.output
    assert BUNDLED_MODEL_NAME in result.output
    assert "bare" in result.output
    assert not (tmp_path / "state").exists()


def test_import_list_show_rm(env: dict[str, str], tiny: Path, tmp_path: Path) -> None:
    result = run(env, "import", str(tiny), "--name", "tiny:v1")
    assert result.exit_code == 0, result.output
    assert "imported tiny:v1" in result.output
    listed = run(env, "list")
    assert "tiny:v1" in listed.output
    assert "model dir" not in listed.output
    shown = run(env, "show", "tiny:v1")
    assert shown.exit_code == 0, shown.output
    assert "deepseek2" in shown.output
    assert "sha256:" in shown.output
    as_json = run(env, "show", "tiny:v1", "--json")
    assert '"architecture": "deepseek2"' in as_json.output
    kept = run(env, "rm", "tiny:v1", stdin="n\n")
    assert kept.exit_code == 1
    assert (tmp_path / "models" / "tiny" / "v1" / "tiny.gguf").is_file()
    removed = run(env, "rm", "tiny:v1", "--yes")
    assert removed.exit_code == 0, removed.output
    assert not (tmp_path / "models" / "tiny").exists()
    missing = run(env, "show", "tiny:v1")
    assert missing.exit_code == 1
    assert "not registered" in missing.output


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "x:../../y", "a\\b"])
def test_traversal_names_are_refused(
    env: dict[str, str], tiny: Path, tmp_path: Path, name: str
) -> None:
    for args in (("import", str(tiny), "--name", name), ("show", name), ("rm", name, "--yes")):
        result = run(env, *args)
        assert result.exit_code == 1, (args, result.output)
        assert "aicc: error: invalid model" in result.output
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # no model dir made


def test_pickle_files_are_refused(env: dict[str, str], tmp_path: Path) -> None:
    for suffix in (".bin", ".pt", ".pth", ".ckpt"):
        source = tmp_path / f"weights{suffix}"
        source.write_bytes(b"\x80\x04")
        result = run(env, "import", str(source), "--name", "weights")
        assert result.exit_code == 1
        assert "pickle-based format" in result.output


def test_catalog(env: dict[str, str]) -> None:
    result = run(env, "catalog")
    assert result.exit_code == 0, result.output
    for alias in ("deepseek-r1:7b", "deepseek-r1:70b", "deepseek-v3", "qwen2.5:7b"):
        assert alias in result.output
    assert '"min_memory_bytes"' in run(env, "catalog", "--json").output


def test_pull_of_an_unknown_alias_says_what_to_do(env: dict[str, str], tmp_path: Path) -> None:
    result = run(env, "pull", "no-such-model:1b", "--endpoint", "http://127.0.0.1:9")
    assert result.exit_code == 1
    assert "aicc models catalog" in result.output
    shutil.rmtree(tmp_path / "models", ignore_errors=True)


def test_pull_progress_shows_size_speed_and_eta() -> None:
    from aicc.cli.models import format_progress
    from aicc.store.download import PullProgress

    # 512 MiB of 1 GiB, 256 MiB of them resumed from disk, 256 MiB fetched in 4 s: 64 MiB/s,
    # so the other 512 MiB take 8 s.
    mib = 1024 * 1024
    line = format_progress(PullProgress("m.gguf", 512 * mib, 1024 * mib, 256 * mib, 4.0))
    assert "m.gguf" in line
    assert "50.0%" in line
    assert "512.0 MiB / 1.0 GiB" in line
    assert "64.0 MiB/s" in line
    assert "ETA 0:08" in line
    verifying = PullProgress("m.gguf", 1024 * mib, 1024 * mib, 0, 10.0, is_verifying=True)
    assert "verifying" in format_progress(verifying)
