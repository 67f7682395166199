"""`aicc eval perplexity|compare`: plaintext paths, and a registered encrypted model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from aicc.cli.eval import eval_group
from aicc.db import Database
from aicc.store.ops import encrypt_model
from aicc.store.registry import ModelRegistry
from tests.models.tiny_deepseek import write_tiny_deepseek

TEXT_FILE = Path(__file__).parents[1] / "data" / "eval_text.txt"
KEY = bytes(range(32))
WINDOW = ("--ctx", "256", "--stride", "128", "--threads", "1")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str | None]:
    """A registry holding `tiny` (plaintext) and `secret` (the same model, encrypted)."""
    state, models = tmp_path / "state", tmp_path / "models"
    database = Database(f"sqlite:///{state / 'aicc.db'}")
    database.migrate()
    registry = ModelRegistry(database, models)
    for name in ("tiny", "secret"):
        directory = models / name / "latest"
        directory.mkdir(parents=True)
        registry.register(name, [write_tiny_deepseek(directory / "t.gguf")], source="import:t")
    encrypt_model(registry, models, "secret", KEY)
    database.close()
    return {
        "AICC_STATE_DIR": str(state),
        "AICC_MODEL_DIR": str(models),
        "AICC_MODEL_KEY": KEY.hex(),
        "AICC_CONFIG": None,
        "AICC_MODEL_KEY_FILE": None,
        "AICC_MODEL_KEY_COMMAND": None,
    }


def run(env: dict[str, str | None], *args: str) -> Result:
    return CliRunner(env=env).invoke(eval_group, list(args))


def test_perplexity_of_a_path_and_of_an_encrypted_model(
    env: dict[str, str | None], tmp_path: Path
) -> None:
    path = tmp_path / "models" / "tiny" / "latest" / "t.gguf"
    plain = run(env, "perplexity", str(path), "--text", str(TEXT_FILE), *WINDOW, "--json")
    assert plain.exit_code == 0, plain.output
    (row,) = json.loads(plain.stdout)
    assert row["model"] == str(path)
    assert row["perplexity"] > 1.0
    assert row["change_pct"] is None
    secret = run(env, "perplexity", "secret", "--text", str(TEXT_FILE), *WINDOW, "--json")
    assert secret.exit_code == 0, secret.output
    assert json.loads(secret.stdout)[0]["perplexity"] == row["perplexity"]
    assert sorted(p.name for p in (tmp_path / "models" / "secret" / "latest").iterdir()) == [
        "t.gguf.aicc-enc"
    ]
    no_key = run({**env, "AICC_MODEL_KEY": None}, "perplexity", "secret", "--text", str(TEXT_FILE))
    assert no_key.exit_code == 1
    assert "no model encryption key is configured" in no_key.stderr


def test_compare_prints_a_table(env: dict[str, str | None]) -> None:
    result = run(env, "compare", "tiny", "secret:latest", "--text", str(TEXT_FILE), *WINDOW)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == ["MODEL", "QUANT", "SIZE", "PPL", "CHANGE"]
    first, second = (line.split("\t") for line in lines[1:])
    assert (first[0], first[4]) == ("tiny", "-")
    assert (second[0], second[4]) == ("secret:latest", "+0.00%")  # the same weights
    assert first[3] == second[3]
    assert "tokens scored in" in result.stderr


def test_bad_input(env: dict[str, str | None], tmp_path: Path) -> None:
    result = run(
        env, "perplexity", "tiny", "--text", str(TEXT_FILE), "--ctx", "64", "--stride", "64"
    )
    assert result.exit_code == 2
    assert "must be below --ctx (64)" in result.stderr
    result = run(env, "perplexity", "nope", "--text", str(TEXT_FILE))
    assert result.exit_code == 1
    assert "model 'nope' is not" in result.stderr
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    result = run(env, "perplexity", "tiny", "--text", str(binary))
    assert result.exit_code == 1
    assert "as UTF-8 text" in result.stderr
