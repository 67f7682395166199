"""What encryption at rest costs a model load, and what a re-quantization costs in quality.

1. Load time of the bundled model (llama.cpp model + context, as the engine loads it):
   plaintext vs encrypted (decrypt into a memfd, then the same load), the key read from a
   temp key file as `aicc serve` would. Rounds alternate; medians are compared.
2. Perplexity of the bundled Q4_K_M model and of a variant re-quantized from it (into a temp
   dir) on the fixed text `tests/data/eval_text.txt`.

Prints both tables; exits 1 when the encrypted/plaintext load-time ratio exceeds 1.5.

    python bench/model_store.py [--rounds 3] [--quant Q8_0] [--threads N] [--ctx 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aicc.cli.output import render_table
from aicc.config import load_settings
from aicc.engine.llamacpp.model import ContextConfig, LlamaModel
from aicc.eval.compare import HEADERS, compare, table_rows
from aicc.store.crypto import decrypt_to_fd, encrypt_file, plaintext_paths
from aicc.store.local import ensure_bundled
from aicc.store.model_keys import load_model_key
from aicc.store.ops import quantize_file

MAX_LOAD_RATIO = 1.5
TEXT_FILE = Path(__file__).parents[1] / "tests" / "data" / "eval_text.txt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quant", default="Q8_0", help="type of the re-quantized variant")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--model-dir", type=Path, default=load_settings().model_dir)
    args = parser.parse_args()
    source = ensure_bundled(args.model_dir).path
    with tempfile.TemporaryDirectory(prefix="aicc-bench-store-") as tmp:
        work = Path(tmp)
        ratio = _load_times(source, work, args.rounds, args.threads)
        _perplexity_table(source, work, args.quant, args.threads, args.ctx, args.stride)
    if ratio > MAX_LOAD_RATIO:
        print(f"MISSED: encrypted load is {ratio:.2f}x plaintext (target ≤ {MAX_LOAD_RATIO}x)")
        return 1
    print(f"ok: encrypted load is {ratio:.2f}x plaintext (target ≤ {MAX_LOAD_RATIO}x)")
    return 0


def _load_times(source: Path, work: Path, rounds: int, threads: int) -> float:
    key_file = work / "model.key"
    key_file.write_text(os.urandom(32).hex())
    key_file.chmod(0o600)
    key = load_model_key(load_settings(model_key_file=key_file))
    encrypted = work / (source.name + ".aicc-enc")
    started = time.perf_counter()
    encrypt_file(source, encrypted, key)
    encrypt_s = time.perf_counter() - started
    config = ContextConfig(512, 128, 1, threads, use_gpu=False, batch_invariant=False)

    def load(path: Path) -> None:
        LlamaModel(path, "bench", config).close()

    def load_plain() -> None:
        load(source)

    def load_encrypted() -> None:
        fresh_key = load_model_key(load_settings(model_key_file=key_file))  # as a server would
        with plaintext_paths([encrypted], fresh_key) as (path,):
            load(path)

    def decrypt_only() -> None:
        os.close(decrypt_to_fd(encrypted, key))

    # One untimed pass of each, so both files sit in the page cache.
    load_plain()
    load_encrypted()
    samples: dict[str, list[float]] = {"plaintext": [], "encrypted": [], "decrypt only": []}
    for _ in range(rounds):
        for name, action in (
            ("plaintext", load_plain),
            ("encrypted", load_encrypted),
            ("decrypt only", decrypt_only),
        ):
            samples[name].append(_timed(action))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    ratio = medians["encrypted"] / medians["plaintext"]
    rows = [
        (name, f"{medians[name]:.3f}", " ".join(f"{v:.3f}" for v in samples[name]))
        for name in samples
    ]
    rows.append(("encrypt (once)", f"{encrypt_s:.3f}", "-"))
    print(f"Model load, {source.name} ({source.stat().st_size / 2**20:.0f} MiB), {rounds} rounds")
    print(render_table(("LOAD", "MEDIAN S", "ROUNDS S"), rows, aligned=True))
    print(f"encrypted / plaintext: {ratio:.2f}x (target ≤ {MAX_LOAD_RATIO}x)\n")
    return ratio


def _perplexity_table(
    source: Path, work: Path, quant: str, threads: int, ctx: int, stride: int
) -> None:
    variant = work / f"gemma-3-270m-{quant.lower()}.gguf"
    started = time.perf_counter()
    quantize_file(source, variant, quant, threads)
    quantize_s = time.perf_counter() - started
    text = TEXT_FILE.read_text(encoding="utf-8")
    started = time.perf_counter()
    scores = compare(
        [(source.name, source), (variant.name, variant)],
        text,
        ctx=ctx,
        stride=stride,
        threads=threads,
    )
    eval_s = time.perf_counter() - started
    result = scores[0].result
    print(
        f"Perplexity on {TEXT_FILE.name}: {result.tokens} tokens, {result.windows} window(s) "
        f"of {ctx} (stride {stride}); quantize {quantize_s:.1f} s, eval {eval_s:.1f} s"
    )
    print(render_table(HEADERS, table_rows(scores), aligned=True))
    print()


def _timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main())
