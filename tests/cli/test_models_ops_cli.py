"""`aicc models encrypt|decrypt|rotate-key|quantize` on a real registry and model dir."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from aicc.cli.models_ops import decrypt, encrypt, quantize, rotate_key
from aicc.db import Database
from aicc.store.crypto import is_encrypted, key_id
from aicc.store.registry import ModelRegistry
from tests.models.tiny_deepseek import write_tiny_deepseek

KEY = bytes(range(32))
NEW_KEY = bytes(range(7, 39))


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str | None]:
    state, models = tmp_path / "state", tmp_path / "models"
    database = Database(f"sqlite:///{state / 'aicc.db'}")
    database.migrate()
    directory = models / "tiny" / "latest"
    directory.mkdir(parents=True)
    path = write_tiny_deepseek(directory / "tiny.gguf")
    ModelRegistry(database, models).register("tiny", [path], source="import:test")
    database.close()
    return {
        "AICC_STATE_DIR": str(state),
        "AICC_MODEL_DIR": str(models),
        "AICC_MODEL_KEY": KEY.hex(),
        "AICC_CONFIG": None,
        "AICC_MODEL_ENCRYPT": None,
        "AICC_MODEL_KEY_FILE": None,
        "AICC_MODEL_KEY_COMMAND": None,
    }


def run(command: object, env: dict[str, str | None], *args: str) -> Result:
    return CliRunner(env=env).invoke(command, list(args))  # type: ignore[arg-type]


def test_encrypt_rotate_decrypt(env: dict[str, str | None], tmp_path: Path) -> None:
    model = tmp_path / "models" / "tiny" / "latest"
    result = run(encrypt, env, "tiny")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"encrypted tiny:latest (1 file(s), key id {key_id(KEY)})\n"
    assert is_encrypted(model / "tiny.gguf.aicc-enc")
    assert not (model / "tiny.gguf").exists()

    old_key_file = tmp_path / "old.key"
    old_key_file.write_text(KEY.hex())
    old_key_file.chmod(0o600)
    rotated = run(
        rotate_key, {**env, "AICC_MODEL_KEY": NEW_KEY.hex()}, "tiny", "--old-key-file",
        str(old_key_file),
    )  # fmt: skip
    assert rotated.exit_code == 0, rotated.output
    assert rotated.stdout == f"re-encrypted tiny:latest under key id {key_id(NEW_KEY)}\n"

    wrong = run(decrypt, env, "tiny")  # still the old key configured
    assert wrong.exit_code == 1
    assert "the model key does not match this file" in wrong.stderr
    result = run(decrypt, {**env, "AICC_MODEL_KEY": NEW_KEY.hex()}, "tiny")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in model.iterdir()) == ["tiny.gguf"]


def test_rotate_key_refusals(env: dict[str, str | None], tmp_path: Path) -> None:
    assert run(encrypt, env, "tiny").exit_code == 0
    key_file = tmp_path / "old.key"
    key_file.write_text(KEY.hex())
    key_file.chmod(0o644)
    result = run(rotate_key, env, "tiny", "--old-key-file", str(key_file))
    assert result.exit_code == 1
    assert "accessible by group or others" in result.stderr
    key_file.chmod(0o600)
    result = run(rotate_key, env, "tiny", "--old-key-file", str(key_file))
    assert result.exit_code == 1
    assert "the old key is the configured key" in result.stderr


def test_quantize_and_errors(env: dict[str, str | None]) -> None:
    result = run(quantize, env, "tiny", "--type", "q8_0", "--name", "tiny:small", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("created tiny:small (Q8_0, ")
    assert result.stdout.endswith(" MiB) from tiny:latest\n")
    encrypted = run(
        quantize, {**env, "AICC_MODEL_ENCRYPT": "true"}, "tiny", "--type", "Q4_0", "--threads", "1"
    )
    assert encrypted.exit_code == 0, encrypted.output
    assert "created tiny:q4_0 (Q4_0, " in encrypted.stdout
    assert ", encrypted) from tiny:latest" in encrypted.stdout

    missing = run(encrypt, env, "nothing:here")
    assert missing.exit_code == 1
    assert "model 'nothing:here' is not registered" in missing.stderr
    no_key = run(encrypt, {**env, "AICC_MODEL_KEY": None}, "tiny")
    assert no_key.exit_code == 1
    assert "no model encryption key is configured" in no_key.stderr
    bad_type = run(quantize, env, "tiny", "--type", "Q7")
    assert bad_type.exit_code == 1
    assert "unknown quantization type 'Q7'" in bad_type.stderr
