"""What the audit log and the metrics cost a cheap authenticated route.

Starts two aicc servers on loopback — audit and metrics on, and both off
(`AICC_AUDIT_ENABLED` / `AICC_METRICS_ENABLED`) — on the bundled model, and measures requests/s
of `GET /v1/models` with an API key using `wrk`. Rounds alternate between the two servers, so a
machine that speeds up or slows down during the run affects both alike. Prints a table and
exits 1 when a target is missed: on/off ratio of the median rounds ≥ 0.7, and ≥ 1,000 req/s
with audit and metrics on.

    python bench/audit_overhead.py [--rounds 3] [--duration 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
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

from aicc.store.local import ensure_bundled

MIN_RATIO = 0.7
MIN_REQUESTS_PER_S = 1000.0
ROUTE = "/v1/models"
BENCH_KEY = "aicc-sk-" + secrets.token_urlsafe(32)
_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    num_requests: int
    num_failed: int
    """Non-2xx/3xx responses and socket errors (any makes the round invalid)."""


@dataclass(frozen=True, slots=True)
class RoundResult:
    index: int
    mode: str
    """"on" (audit and metrics) or "off"."""
    wrk: WrkResult


def parse_wrk(output: str) -> WrkResult:
    """Read `wrk --latency` output. Raises ValueError when a figure is missing."""

    def number(pattern: str) -> str:
        match = re.search(pattern, output)
        if match is None:
            raise ValueError(f"no {pattern!r} in wrk output:\n{output}")
        return match.group(1)

    def latency_ms(percentile: str) -> float:
        match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
        if match is None:
            raise ValueError(f"no {percentile}% latency in wrk output:\n{output}")
        return float(match.group(1)) * _UNITS_MS[match.group(2)]

    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    num_failed = sum(int(n) for n in errors.groups()) if errors else 0
    return WrkResult(
        requests_per_s=float(number(r"Requests/sec:\s+([\d.]+)")),
        p50_ms=latency_ms("50"),
        p99_ms=latency_ms("99"),
        num_requests=int(number(r"(\d+) requests in")),
        num_failed=num_failed + (int(non_2xx.group(1)) if non_2xx else 0),
    )


def run_wrk(wrk: str, url: str, duration_s: int, connections: int) -> WrkResult:
    command = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--latency",
        "-H",
        f"Authorization: Bearer {BENCH_KEY}",
        url + ROUTE,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def aicc_server(model_path: Path, is_on: bool, workdir: Path) -> Iterator[str]:
    """An aicc server with audit and metrics on or off; yields its URL once it answers."""
    mode = "on" if is_on else "off"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    state_dir = workdir / f"state-{mode}"
    log = workdir / f"aicc-{mode}.log"
    flag = "true" if is_on else "false"
    env = {
        "AICC_AUDIT_ENABLED": flag,
        "AICC_METRICS_ENABLED": flag,
        **os.environ,
        "AICC_ADMIN_KEY": BENCH_KEY,
        "AICC_STATE_DIR": str(state_dir),
        "AICC_LOG_LEVEL": "warning",
    }
    command = [
        sys.executable,
        "-m",
        "aicc",
        "serve",
        "--model-path",
        str(model_path),
        "--port",
        str(port),
        "--max-batch-size",
        "1",
        "--ctx-size",
        "512",
    ]
    with log.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_until_ready(process, url, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    headers = {"Authorization": f"Bearer {BENCH_KEY}"}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"aicc exited with {process.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(url + ROUTE, headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"aicc did not answer within 300 s:\n{_tail(log)}")


def _tail(log: Path, num_lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-num_lines:])


def print_table(rounds: list[RoundResult]) -> None:
    print(f"{'round':>5}  {'mode':<4}  {'req/s':>9}  {'p50 ms':>8}  {'p99 ms':>8}  {'failed':>6}")
    for r in rounds:
        w = r.wrk
        print(
            f"{r.index:>5}  {r.mode:<4}  {w.requests_per_s:>9.0f}  {w.p50_ms:>8.2f}  "
            f"{w.p99_ms:>8.2f}  {w.num_failed:>6}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode")
    parser.add_argument("--duration", type=int, default=10, help="seconds per round")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        print(
            "wrk is not installed: run scripts/install-test-deps.sh (or apt-get install wrk)",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="aicc-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        model = ensure_bundled(workdir / "models")
        print(f"starting two aicc servers (audit+metrics on / off) on {model.name} ...")
        urls = {
            "on": stack.enter_context(aicc_server(model.path, True, workdir)),
            "off": stack.enter_context(aicc_server(model.path, False, workdir)),
        }
        for url in urls.values():  # warm-up: connections, caches, the credential cache
            run_wrk(wrk, url, 2, args.connections)
        rounds: list[RoundResult] = []
        for index in range(1, args.rounds + 1):
            # Alternate which mode goes first, so neither always runs on a warmer machine.
            order = ("on", "off") if index % 2 else ("off", "on")
            for mode in order:
                result = run_wrk(wrk, urls[mode], args.duration, args.connections)
                rounds.append(RoundResult(index, mode, result))
    print()
    print_table(rounds)
    return report(rounds)


def report(rounds: list[RoundResult]) -> int:
    """Print the targets and return the exit status (1 when one is missed)."""
    on = statistics.median(r.wrk.requests_per_s for r in rounds if r.mode == "on")
    off = statistics.median(r.wrk.requests_per_s for r in rounds if r.mode == "off")
    ratio = on / off if off else 0.0
    num_failed = sum(r.wrk.num_failed for r in rounds)
    checks = [
        (f"on/off ratio {ratio:.2f} >= {MIN_RATIO}", ratio >= MIN_RATIO),
        (f"on {on:.0f} req/s >= {MIN_REQUESTS_PER_S:.0f}", on >= MIN_REQUESTS_PER_S),
        (f"failed requests {num_failed} == 0", num_failed == 0),
    ]
    print(f"\nmedian req/s: on {on:.0f}, off {off:.0f}")
    for text, is_met in checks:
        print(f"  [{'ok' if is_met else 'MISSED'}] {text}")
    return 0 if all(is_met for _, is_met in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
