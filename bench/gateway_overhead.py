"""What routing through an aicc gateway costs, against calling the upstream directly.

Starts an upstream aicc on the bundled model and a gateway whose deployment `bench` has one
variant with that upstream as its only replica (a remote replica: every request is proxied,
streamed through, metered and audited by the gateway). The same streamed chat load (aicc's own
load generator, `aicc.loadgen`) runs against the upstream directly and through the gateway,
in alternating rounds: a latency phase and a throughput phase (`--concurrency`). Prints a
table and exits 1 when a target is missed: added median latency ≤ 3 ms, and throughput
through the gateway ≥ 0.9 × direct. The throughput ratio is the median of the rounds' own
ratios: a round's two runs follow each other, so a drift of the machine's speed over the
minutes of the bench (20–40% on a shared machine) moves both alike.

The latency phase measures what the gateway adds to one request: the same short streamed
request (one output token, a prompt the upstream's prefix cache holds, so the engine's share
is small and steady) goes alternately direct and through the gateway, one at a time, each
path on its own kept-alive connection; the added latency is the median of the differences of
all rounds' pairs. Without the cache a request costs ~200 ms of prompt processing on one
thread, whose jitter (±40 ms) would hide a difference of a few milliseconds; with it, one
engine step (~45 ms) still moves a pair's difference by several milliseconds, so a round's
own median (the table's column) moves by ±1 ms and the target is judged on all pairs together.

    python bench/gateway_overhead.py [--rounds 5] [--requests 64] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from aicc.loadgen.datasets import random_prompts
from aicc.loadgen.runner import Load, Target, run_load
from aicc.loadgen.stats import summarize
from aicc.store.local import ensure_bundled

MAX_ADDED_MS = 3.0
MIN_RATIO = 0.9
UPSTREAM_KEY = "aicc-sk-" + secrets.token_urlsafe(32)
GATEWAY_KEY = "aicc-sk-" + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Round:
    index: int
    path: str
    """"direct" or "gateway"."""
    latency_ms: float
    """Median end-to-end time of one request alone, one output token."""
    added_ms: float
    """Median of (gateway − direct) over the round's request pairs (the gateway's rows)."""
    differences: tuple[float, ...]
    """The round's (gateway − direct) per pair, ms (the gateway's rows; empty for direct)."""
    median_e2e_ms: float
    requests_per_s: float
    num_failed: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def aicc_server(
    name: str, workdir: Path, key: str, model: Path, env: dict[str, str], config: str = ""
) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config_file = workdir / f"{name}.yaml"
    config_file.write_text(config)
    command = [sys.executable, "-m", "aicc", "serve", "--model-path", str(model)]
    command += ["--port", str(port), "--config", str(config_file)]
    environment = {
        **os.environ,
        **env,
        "AICC_ADMIN_KEY": key,
        "AICC_STATE_DIR": str(workdir / f"state-{name}"),
        "AICC_LOG_LEVEL": "warning",
    }
    log = workdir / f"{name}.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=environment
        )
        try:
            _wait_until_ready(process, url, key, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_ready(process: subprocess.Popen[bytes], url: str, key: str, log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"aicc exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            response = httpx.get(f"{url}/readyz", timeout=2)
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"aicc did not become ready:\n{log.read_text()[-3000:]}")


def measure(
    url: str, key: str, model: str, args: argparse.Namespace, seed: int
) -> tuple[float, float, int]:
    """(median E2E ms, requests/s, failures) of one round."""
    target = Target(
        base_url=url, model=model, api_key=key, output_len=args.output_len, ignore_eos=True
    )
    prompts = random_prompts(args.requests, args.input_len, seed)
    run = asyncio.run(run_load(target, prompts, Load(concurrency=args.concurrency, seed=seed)))
    summary = summarize(run)
    ok = [r for r in run.requests if r.is_ok]
    median_ms = statistics.median(r.e2e_s for r in ok) * 1000 if ok else float("inf")
    return median_ms, summary.request_throughput, len(run.requests) - len(ok)


LATENCY_PROMPT = (
    "You are taking part in a latency test of an API gateway. Read this paragraph, ignore "
    "what it says, and reply with exactly one word, hello, and nothing else at all."
)
"""Long enough (with the chat template, over 32 tokens: the engine's `min_cached_prefix`) for
the upstream's prefix cache to hold it after the warm-up."""


def measure_latency(
    paths: dict[str, tuple[str, str, str]], order: tuple[str, ...], pairs: int
) -> dict[str, tuple[float, list[float]]]:
    """Per path: (median ms, its differences to the first path per pair in ms), from
    `pairs` rounds of one streamed request per path, alternating."""
    clients = {
        path: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        for path, (url, key, _) in paths.items()
    }
    times: dict[str, list[float]] = {path: [] for path in order}
    try:
        for _ in range(pairs):
            for path in order:
                body = {
                    "model": paths[path][2],
                    "messages": [{"role": "user", "content": LATENCY_PROMPT}],
                    "max_tokens": 1,
                    "stream": True,
                }
                started = time.perf_counter()
                with clients[path].stream("POST", "/v1/chat/completions", json=body) as answer:
                    answer.raise_for_status()
                    for _line in answer.iter_lines():
                        pass
                times[path].append((time.perf_counter() - started) * 1000)
    finally:
        for client in clients.values():
            client.close()
    first = times[order[0]]
    return {
        path: (statistics.median(values), [b - a for a, b in zip(first, values, strict=True)])
        for path, values in times.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=64, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=100, help="latency pairs per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aicc-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        model = ensure_bundled(workdir / "models")
        print(f"starting an upstream and a gateway on {model.name} ...")
        # One llama.cpp thread: on a 2-core machine the other core is the gateway's and the
        # load generator's (llama.cpp's threads spin at barriers: any other busy process on
        # their cores stalls every step, which would measure contention, not the gateway).
        upstream_env = {"AICC_THREADS": "1"}
        upstream = stack.enter_context(
            aicc_server("upstream", workdir, UPSTREAM_KEY, model.path, upstream_env)
        )
        gateway_config = (
            "deployments:\n"
            "  - model: bench\n"
            "    variants:\n"
            "      - name: v1\n"
            "        weight: 1\n"
            "        replicas:\n"
            f"          - url: {upstream}\n"
            f"            model: {model.name}\n"
            "            api_key_env: BENCH_UPSTREAM_KEY\n"
        )
        gateway = stack.enter_context(
            aicc_server(
                "gateway",
                workdir,
                GATEWAY_KEY,
                model.path,
                {"BENCH_UPSTREAM_KEY": UPSTREAM_KEY, "AICC_THREADS": "1"},
                gateway_config,
            )
        )
        paths = {
            "direct": (upstream, UPSTREAM_KEY, model.name),
            "gateway": (gateway, GATEWAY_KEY, "bench"),
        }
        for url, key, name in paths.values():  # warm-up: connections, caches
            measure(url, key, name, argparse.Namespace(**{**vars(args), "requests": 8}), seed=0)
        measure_latency(paths, ("direct", "gateway"), 4)  # the prompt into the prefix cache
        rounds: list[Round] = []
        for index in range(1, args.rounds + 1):
            latency = measure_latency(paths, ("direct", "gateway"), args.pairs)
            order = ("direct", "gateway") if index % 2 else ("gateway", "direct")
            for path in order:
                # Each path its own prompts (the upstream's prefix cache must not serve one
                # path the other's), new ones each round.
                seed = 2 * index + (path == "gateway")
                median_ms, rate, failed = measure(*paths[path], args, seed=seed)
                latency_ms, differences = latency[path]
                own = tuple(differences) if path == "gateway" else ()
                added_ms = statistics.median(differences)
                rounds.append(
                    Round(index, path, latency_ms, added_ms, own, median_ms, rate, failed)
                )
    print_table(rounds)
    return report(rounds)


def print_table(rounds: list[Round]) -> None:
    ratios = round_ratios(rounds)
    print(
        f"\n{'round':>5}  {'path':<8}  {'alone ms':>8}  {'added ms':>8}  "
        f"{'median e2e ms':>13}  {'req/s':>7}  {'ratio':>6}  {'failed':>6}"
    )
    for r in rounds:
        is_gateway = r.path == "gateway"
        added = f"{r.added_ms:>8.2f}" if is_gateway else f"{'-':>8}"
        ratio = f"{ratios[r.index]:>6.3f}" if is_gateway else f"{'-':>6}"
        print(
            f"{r.index:>5}  {r.path:<8}  {r.latency_ms:>8.1f}  {added}  "
            f"{r.median_e2e_ms:>13.1f}  {r.requests_per_s:>7.2f}  {ratio}  {r.num_failed:>6}"
        )


def round_ratios(rounds: list[Round]) -> dict[int, float]:
    """Per round: requests/s through the gateway ÷ direct."""
    rates = {(r.index, r.path): r.requests_per_s for r in rounds}
    indices = sorted({r.index for r in rounds})
    return {i: rates[i, "gateway"] / rates[i, "direct"] for i in indices}


def report(rounds: list[Round]) -> int:
    differences = [d for r in rounds for d in r.differences]
    added_ms = statistics.median(differences)
    ratio = statistics.median(round_ratios(rounds).values())
    failed = sum(r.num_failed for r in rounds)
    checks = [
        (
            f"added median latency {added_ms:.1f} ms <= {MAX_ADDED_MS:.0f} ms "
            f"(all {len(differences)} pairs)",
            added_ms <= MAX_ADDED_MS,
        ),
        (f"throughput ratio {ratio:.3f} >= {MIN_RATIO} (median of rounds)", ratio >= MIN_RATIO),
        (f"failed requests {failed} == 0", failed == 0),
    ]
    print()
    for text, is_met in checks:
        print(f"  [{'ok' if is_met else 'MISSED'}] {text}")
    return 0 if all(is_met for _, is_met in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
