"""Streaming throughput and latency of aicc beside its peers, on the same model and machine.

Starts, one after another on loopback ports: aicc, (a) llama-cpp-python's own OpenAI server
(`python -m llama_cpp.server`), and (b) llama.cpp's C++ `llama-server` (built with CMake from the
llama.cpp vendored in the llama-cpp-python sdist, into a cache directory outside the repository).
At each concurrency it streams completions (fixed prompts, up to 128 tokens each, EOS ignored where
the server allows it) and reports aggregate output tokens/s and TTFT/TPOT (median, p99). It prints
a table and exits 1 when a target (ratios measured side by side in this run) is missed.

    python bench/throughput.py [--concurrency 1,4,16,32]
                               [--peers aicc,llama-cpp-python,llama-server]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aicc.store.local import ensure_bundled
from llama_server_build import ensure_llama_server

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a walk through a busy market in a city by the sea.",
    "Write a letter from a young sailor to his family back home.",
    "Tell the history of a small mountain village over one hundred years.",
    "Describe how to bake bread at home, from flour to loaf.",
    "Write a detailed travel guide for a week in an imaginary country.",
    "Tell a story about two friends who build a boat together.",
]
MAX_TOKENS = 128


@dataclass(frozen=True, slots=True)
class RequestResult:
    num_tokens: int
    ttft_s: float
    e2e_s: float

    @property
    def tpot_s(self) -> float | None:
        if self.num_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_tokens - 1)


@dataclass(frozen=True, slots=True)
class LevelResult:
    server: str
    concurrency: int
    num_requests: int
    num_tokens: int
    duration_s: float
    ttft_median_ms: float
    ttft_p99_ms: float
    tpot_median_ms: float
    tpot_p99_ms: float

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.duration_s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running(command: list[str], port: int, log: Path) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{command[0]} exited; see {log}")
                try:
                    if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{command[0]} did not start; see {log}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


async def one_request(client: httpx.AsyncClient, model: str, prompt: str) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = 0.0
    num_chunks = 0
    usage_tokens = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage_tokens = chunk["usage"].get("completion_tokens")
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                num_chunks += 1
                if not first:
                    first = time.perf_counter()
    end = time.perf_counter()
    return RequestResult(usage_tokens or num_chunks, (first or end) - start, end - start)


async def run_level(url: str, server: str, model: str, concurrency: int) -> LevelResult:
    num_requests = max(concurrency, 4)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_requests)]
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one_request(client, model, "Warm up.")
        queue: asyncio.Queue[str] = asyncio.Queue()
        for prompt in prompts:
            queue.put_nowait(prompt)
        results: list[RequestResult] = []

        async def worker() -> None:
            while not queue.empty():
                results.append(await one_request(client, model, queue.get_nowait()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - start
    ttfts = sorted(r.ttft_s * 1000 for r in results)
    tpots = sorted(t * 1000 for r in results if (t := r.tpot_s) is not None)
    return LevelResult(
        server=server,
        concurrency=concurrency,
        num_requests=num_requests,
        num_tokens=sum(r.num_tokens for r in results),
        duration_s=duration,
        ttft_median_ms=statistics.median(ttfts),
        ttft_p99_ms=_p99(ttfts),
        tpot_median_ms=statistics.median(tpots) if tpots else float("nan"),
        tpot_p99_ms=_p99(tpots) if tpots else float("nan"),
    )


def _p99(values: list[float]) -> float:
    return values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]


def bench_server(
    name: str, gguf: Path, levels: list[int], threads: int, workdir: Path
) -> list[LevelResult]:
    results = []
    model = "bench-model"
    ctx = 8192
    if name == "llama-server":
        binary = ensure_llama_server(workdir.parent / "llama-server-build")
        for concurrency in levels:
            port = free_port()
            command = [
                str(binary), "-m", str(gguf), "--port", str(port), "-t", str(threads),
                "-np", str(concurrency), "-c", str(max(ctx, 256 * concurrency)), "-a", model,
                "--no-webui",
            ]  # fmt: skip
            with running(command, port, workdir / f"{name}-{concurrency}.log") as url:
                results.append(asyncio.run(run_level(url, name, model, concurrency)))
                _print_row(results[-1])
        return results
    port = free_port()
    if name == "aicc":
        command = [
            sys.executable, "-m", "aicc", "serve", "--model-path", str(gguf), "--port", str(port),
            "--threads", str(threads), "--max-batch-size", str(max(levels)),
            "--ctx-size", str(ctx), "--served-model-name", model,
        ]  # fmt: skip
    else:
        command = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(ctx),
            "--model_alias", model,
        ]  # fmt: skip
    with running(command, port, workdir / f"{name}.log") as url:
        for concurrency in levels:
            results.append(asyncio.run(run_level(url, name, model, concurrency)))
            _print_row(results[-1])
    return results


def _print_row(r: LevelResult) -> None:
    print(
        f"{r.server:<17} {r.concurrency:>4} {r.num_requests:>5} {r.num_tokens:>7} "
        f"{r.tokens_per_s:>9.1f} {r.ttft_median_ms:>9.0f} {r.ttft_p99_ms:>9.0f} "
        f"{r.tpot_median_ms:>9.1f} {r.tpot_p99_ms:>9.1f}",
        flush=True,
    )


def check_targets(results: list[LevelResult]) -> list[tuple[str, float, float, bool]]:
    """(description, measured ratio, target, met) for each target whose inputs were measured."""
    by_key = {(r.server, r.concurrency): r for r in results}
    checks = []

    def ratio(
        label: str, server: str, peer: str, level: int, target: float, ttft: bool = False
    ) -> None:
        mine, theirs = by_key.get((server, level)), by_key.get((peer, level))
        if mine is None or theirs is None:
            return
        if ttft:
            value = mine.ttft_median_ms / theirs.ttft_median_ms
            checks.append((label, value, target, value <= target))
        else:
            value = mine.tokens_per_s / theirs.tokens_per_s
            checks.append((label, value, target, value >= target))

    ratio("tok/s @16: aicc / llama-server  >=", "aicc", "llama-server", 16, 1.0)
    ratio("tok/s @16: aicc / llama-cpp-python server  >=", "aicc", "llama-cpp-python", 16, 4.0)
    ratio("tok/s @1:  aicc / llama-server  >=", "aicc", "llama-server", 1, 0.95)
    ratio("median TTFT @16: aicc / llama-server  <=", "aicc", "llama-server", 16, 1.2, ttft=True)
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--peers", default="aicc,llama-cpp-python,llama-server")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "aicc" / "bench")
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    gguf = ensure_bundled(args.workdir / "models").path
    print(
        f"model {gguf.name}, {args.threads} threads, {MAX_TOKENS} tokens per request\n"
        f"{'server':<17} {'conc':>4} {'reqs':>5} {'tokens':>7} {'tok/s':>9} "
        f"{'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9}  (ms)"
    )
    results: list[LevelResult] = []
    for name in args.peers.split(","):
        results += bench_server(name, gguf, levels, args.threads, args.workdir)
    checks = check_targets(results)
    print("\ntarget                                            measured  target  result")
    for label, value, target, met in checks:
        print(f"{label:<48} {value:>8.2f} {target:>7.2f}  {'ok' if met else 'MISSED'}")
    return 0 if all(met for *_, met in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
