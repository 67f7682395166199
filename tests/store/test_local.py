from pathlib import Path

import pytest

from aicc.errors import ModelNotFoundError
from aicc.store.local import BUNDLED_MODEL_NAME, list_models, resolve_model


def test_bundled_model_is_listed_and_resolved(model_dir: Path) -> None:
    models = list_models(model_dir)
    assert models[0].name == BUNDLED_MODEL_NAME
    assert models[0].is_bundled
    assert models[0].is_present
    resolved = resolve_model(BUNDLED_MODEL_NAME, model_dir)
    assert resolved.path == model_dir / f"{BUNDLED_MODEL_NAME}.gguf"
    with resolved.path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_files_in_model_dir_and_paths(tmp_path: Path) -> None:
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    assert [m.name for m in list_models(tmp_path)] == [BUNDLED_MODEL_NAME, "tiny"]
    assert not list_models(tmp_path)[0].is_present
    assert resolve_model("tiny", tmp_path).path == tmp_path / "tiny.gguf"
    assert resolve_model(str(tmp_path / "tiny.gguf"), tmp_path).name == "tiny"


@pytest.mark.parametrize("spec", ["missing", "../etc/passwd", "/no/such/file.gguf", "a b"])
def test_unknown_or_unsafe_names(tmp_path: Path, spec: str) -> None:
    with pytest.raises(ModelNotFoundError):
        resolve_model(spec, tmp_path)
