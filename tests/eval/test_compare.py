"""Two models on one text: the table `aicc eval compare` prints."""

from __future__ import annotations

import math
from pathlib import Path

import llama_cpp
import pytest

from aicc.eval.compare import HEADERS, compare, read_quantization, relative_change, table_rows
from aicc.eval.perplexity import perplexity
from tests.models.tiny_deepseek import write_tiny_deepseek

TEXT = (Path(__file__).parents[1] / "data" / "eval_text.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tiny")
    source = write_tiny_deepseek(directory / "tiny.gguf")
    target = directory / "tiny-q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) == 0
    return source, target


def test_compare_table(tiny_pair: tuple[Path, Path]) -> None:
    source, quantized = tiny_pair
    scores = compare(
        [("tiny", source), ("tiny:q8_0", quantized)], TEXT, ctx=256, stride=128, threads=1
    )
    first, second = scores
    assert first.result == perplexity(source, TEXT, ctx=256, stride=128, threads=1)
    assert first.change_pct is None
    assert second.change_pct == pytest.approx(relative_change(first.result.ppl, second.result.ppl))
    assert second.result.ppl != first.result.ppl  # Q8_0 rounds the weights
    assert abs(second.change_pct) < 5.0  # … but only a little
    assert second.quantization == "Q8_0"
    assert second.size_bytes == quantized.stat().st_size < first.size_bytes
    rows = table_rows(scores)
    assert HEADERS == ("MODEL", "QUANT", "SIZE", "PPL", "CHANGE")
    assert rows[0][0] == "tiny"
    assert rows[0][4] == "-"
    assert rows[1][:2] == ("tiny:q8_0", "Q8_0")
    assert rows[1][3] == f"{second.result.ppl:.4f}"
    assert rows[1][4] == f"{second.change_pct:+.2f}%"
    assert rows[1][2].endswith("KiB") or rows[1][2].endswith("MiB")


def test_relative_change_and_quantization_of_non_gguf(tmp_path: Path) -> None:
    assert relative_change(10.0, 10.2) == pytest.approx(2.0)
    assert relative_change(10.0, 9.0) == pytest.approx(-10.0)
    assert math.isclose(relative_change(5.0, 5.0), 0.0)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a model")
    assert read_quantization(text_file) is None
    assert read_quantization(tmp_path / "absent.gguf") is None
