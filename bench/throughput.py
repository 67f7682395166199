"""Streaming throughput and latency of aicc beside its peers, on the same model and machine.

Starts on loopback ports: aicc, (a) llama-cpp-python's own OpenAI server (`python -m
llama_cpp.server`, as shipped: a new request interrupts the stream in progress, and those cut
streams count with the tokens they delivered), (a') the same server with
`--interrupt_requests False` (requests queue instead; information only), and (b) llama.cpp's
C++ `llama-server` (built with CMake from the llama.cpp vendored in the llama-cpp-python sdist,
into a cache directory outside the repository).
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
from contextlib import ExitStack, contextmanager
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
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.num_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_tokens - 1)


@dataclass(frozen=True, slots=True)
class Round:
    """One burst: `concurrency` clients streaming until the request list is done."""

    requests: tuple[RequestResult, ...]
    duration_s: float

    @property
    def tokens_per_s(self) -> float:
        return sum(r.num_tokens for r in self.requests) / self.duration_s


@dataclass(frozen=True, slots=True)
class LevelResult:
    """All rounds of one server at one concurrency: throughput is the median round's,
    latency percentiles pool every request of every round."""

    server: str
    concurrency: int
    rounds: tuple[Round, ...]

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(r.tokens_per_s for r in self.rounds)

    @property
    def num_requests(self) -> int:
        return sum(len(r.requests) for r in self.rounds)

    def _all(self) -> list[RequestResult]:
        return [request for r in self.rounds for request in r.requests if request.num_tokens]

    @property
    def num_failed(self) -> int:
        return sum(request.error is not None for r in self.rounds for request in r.requests)

    @property
    def ttft_ms(self) -> list[float]:
        return sorted(r.ttft_s * 1000 for r in self._all())

    @property
    def tpot_ms(self) -> list[float]:
        return sorted(t * 1000 for r in self._all() if (t := r.tpot_s) is not None)


BENCH_KEY = "aicc-sk-BenchmarkKey0123456789abcdefghijklmnopqrst"
"""aicc's admin key in this run (peers ignore the header)."""
AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running(command: list[str], port: int, log: Path) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as log_file:
        # aicc's state (database, secret) goes to a fresh folder beside the log.
        env = {**os.environ, "AICC_ADMIN_KEY": BENCH_KEY, "AICC_STATE_DIR": str(log) + ".state"}
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 300
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{command[0]} exited; see {log}")
                try:
                    if httpx.get(url + "/v1/models", headers=AUTH, timeout=2).status_code == 200:
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
    """Stream one completion. A failure is recorded with the tokens that did arrive."""
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
    error = None
    try:
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
    except (httpx.HTTPError, ValueError) as exc:
        error = type(exc).__name__
    end = time.perf_counter()
    return RequestResult(usage_tokens or num_chunks, (first or end) - start, end - start, error)


async def warm_up(url: str, model: str) -> None:
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=600) as client:
        await one_request(client, model, "Warm up.")


async def run_round(url: str, model: str, concurrency: int, round_index: int) -> Round:
    """One burst of `concurrency` requests, all sent at once."""
    prompts = [PROMPTS[(round_index + i) % len(PROMPTS)] for i in range(concurrency)]
    # A fresh connection per request: llama-server closes kept-alive connections after a few
    # requests, and a reused dead connection would fail a request for the client's sake.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=600, limits=limits) as client:
        queue: asyncio.Queue[str] = asyncio.Queue()
        for prompt in prompts:
            queue.put_nowait(prompt)
        results: list[RequestResult] = []

        async def worker() -> None:
            while not queue.empty():
                results.append(await one_request(client, model, queue.get_nowait()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Round(tuple(results), time.perf_counter() - start)


def _p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


MODEL_ALIAS = "bench-model"
CTX = 8192


def server_command(name: str, gguf: Path, port: int, threads: int, concurrency: int) -> list[str]:
    """How each server is started: same model file, threads and context."""
    if name == "aicc":
        return [
            sys.executable, "-m", "aicc", "serve", "--model-path", str(gguf), "--port", str(port),
            "--threads", str(threads), "--max-batch-size", str(concurrency),
            "--ctx-size", str(CTX), "--served-model-name", MODEL_ALIAS,
        ]  # fmt: skip
    if name in ("llama-cpp-python", "llama-cpp-python-serial"):
        # "llama-cpp-python" runs as shipped: a new request interrupts the stream in progress.
        # "-serial" turns that off, so requests queue behind one another instead.
        interrupt = "True" if name == "llama-cpp-python" else "False"
        return [
            sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(CTX),
            "--model_alias", MODEL_ALIAS, "--interrupt_requests", interrupt,
        ]  # fmt: skip
    if name == "llama-server":
        binary = ensure_llama_server(Path.home() / ".cache" / "aicc" / "llama-server-build")
        return [
            str(binary), "-m", str(gguf), "--port", str(port), "-t", str(threads),
            "-np", str(concurrency), "-c", str(max(CTX, 256 * concurrency)), "-a", MODEL_ALIAS,
            "--no-webui",
        ]  # fmt: skip
    raise SystemExit(f"unknown server {name!r}")


def run_benchmark(
    names: list[str], gguf: Path, levels: list[int], threads: int, rounds: int, workdir: Path
) -> list[LevelResult]:
    """Servers are measured in alternating rounds at each level, so that drift in the
    machine's speed (shared hosts) falls on all of them alike. llama-server is restarted per
    level with -np equal to the concurrency; the others serve every level from one process.
    llama-cpp-python's server, slow at high concurrency, runs one round per level."""

    results = []
    with ExitStack() as stack:
        urls: dict[str, str] = {}
        for name in names:
            if name != "llama-server":
                port = free_port()
                command = server_command(name, gguf, port, threads, max(levels))
                urls[name] = stack.enter_context(running(command, port, workdir / f"{name}.log"))
        for concurrency in levels:
            with ExitStack() as level_stack:
                if "llama-server" in names:
                    port = free_port()
                    command = server_command("llama-server", gguf, port, threads, concurrency)
                    log = workdir / f"llama-server-{concurrency}.log"
                    urls["llama-server"] = level_stack.enter_context(running(command, port, log))
                collected: dict[str, list[Round]] = {name: [] for name in names}
                for name in names:
                    asyncio.run(warm_up(urls[name], MODEL_ALIAS))
                # Short bursts, many of them at low concurrency: the host's speed drifts by
                # +-10% within seconds, and fine interleaving spreads that over every server.
                num_rounds = max(rounds, 16 // concurrency)
                for round_index in range(num_rounds):
                    order = names[round_index % len(names) :] + names[: round_index % len(names)]
                    for name in order:
                        if name.startswith("llama-cpp-python") and round_index >= 2:
                            continue
                        collected[name].append(
                            asyncio.run(
                                run_round(urls[name], MODEL_ALIAS, concurrency, round_index)
                            )
                        )
                for name in names:
                    results.append(LevelResult(name, concurrency, tuple(collected[name])))
                    _print_row(results[-1])
    return results


def _print_row(r: LevelResult) -> None:
    ttft, tpot = r.ttft_ms, r.tpot_ms
    print(
        f"{r.server:<17} {r.concurrency:>4} {r.num_requests:>5} {r.num_failed:>4} "
        f"{r.tokens_per_s:>9.1f} "
        f"{_median(ttft):>9.0f} {_p99(ttft):>9.0f} "
        f"{_median(tpot):>9.1f} {_p99(tpot):>9.1f}",
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
            value = _median(mine.ttft_ms) / _median(theirs.ttft_ms)
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
    parser.add_argument(
        "--peers",
        default="aicc,llama-cpp-python,llama-server",
        help="any of aicc, llama-cpp-python, llama-cpp-python-serial, llama-server",
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "aicc" / "bench")
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    gguf = ensure_bundled(args.workdir / "models").path
    print(
        f"model {gguf.name}, {args.threads} threads, {MAX_TOKENS} tokens per request, "
        f"{args.rounds} alternating rounds\n"
        f"{'server':<17} {'conc':>4} {'reqs':>5} {'fail':>4} {'tok/s':>9} "
        f"{'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9}  (ms)"
    )
    names = args.peers.split(",")
    results = run_benchmark(names, gguf, levels, args.threads, args.rounds, args.workdir)
    checks = check_targets(results)
    print("\ntarget                                            measured  target  result")
    for label, value, target, met in checks:
        print(f"{label:<48} {value:>8.2f} {target:>7.2f}  {'ok' if met else 'MISSED'}")
    for r in results:
        if r.num_failed:
            print(f"{r.server} @{r.concurrency}: {r.num_failed} requests cut short")
    info = [
        ("tok/s @16: aicc / llama-cpp-python-serial", "aicc", "llama-cpp-python-serial", 16),
        ("tok/s @16: llama-server / llama-cpp-python-serial", "llama-server",
         "llama-cpp-python-serial", 16),
        ("tok/s @32: aicc / llama-server", "aicc", "llama-server", 32),
    ]  # fmt: skip
    by_key = {(r.server, r.concurrency): r for r in results}
    for label, mine, theirs, level in info:
        if (mine, level) in by_key and (theirs, level) in by_key:
            ratio = by_key[(mine, level)].tokens_per_s / by_key[(theirs, level)].tokens_per_s
            print(f"{label:<48} {ratio:>8.2f}   (information)")
    aicc_failed = any(r.num_failed for r in results if r.server == "aicc")
    return 0 if all(met for *_, met in checks) and not aicc_failed else 1


if __name__ == "__main__":
    sys.exit(main())
