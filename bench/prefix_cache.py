"""Prefix caching: time to first token with a ~1,000-token shared system prompt, cold vs. cached.

Starts aicc (bundled model) on a loopback port and sends chat requests that ask for one token,
so the latency is the prefill plus one decode step:
- cold: a system prompt never seen before (a new session line at its very start, so no cached
  prefix matches beyond the first tokens);
- warm: the previous request's system prompt with a new user turn (same API key);
- other tenant: the warm prompt sent with another API key — must be as slow as cold, because
  cached prefixes are shared only within a tenant (the CVE-2025-46570 class of timing leaks).
Prints a table; exits 1 unless warm TTFT is at least 5x lower than cold and the other tenant
gets no speed-up (its TTFT at least half the cold one).

    python bench/prefix_cache.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import uvicorn

from aicc.api.app import create_app
from aicc.config import load_settings
from aicc.store.local import BUNDLED_MODEL_NAME, ensure_bundled

TARGET_SPEEDUP = 5.0
SYSTEM_BODY = (
    "You are the support assistant of a large utility company. Answer politely, cite the "
    "relevant tariff rule, never invent account data, and escalate billing disputes. "
)


def system_prompt(session: int) -> str:
    return f"Session {session}. " + SYSTEM_BODY * 40


def ttft(client: openai.OpenAI, system: str, question: str) -> float:
    start = time.perf_counter()
    client.chat.completions.create(
        model=BUNDLED_MODEL_NAME,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=1,
        temperature=0,
    )
    return time.perf_counter() - start


ADMIN = "aicc-sk-BenchmarkKey0123456789abcdefghijklmnopqrst"


def user_key(url: str, username: str) -> str:
    """A new user holding the `user` role, and an API key of theirs."""
    base = url.removesuffix("/v1")
    auth = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=base, headers=auth, timeout=30) as admin:
        admin.post("/admin/users", json={"username": username, "roles": ["user"]})
        response = admin.post("/admin/keys", json={"user": username, "name": "bench"})
        response.raise_for_status()
        key: str = response.json()["key"]
        return key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model_dir = Path(tempfile.gettempdir()) / "aicc-bench-models"
    ensure_bundled(model_dir)
    state_dir = Path(tempfile.mkdtemp(prefix="aicc-bench-state-"))
    settings = load_settings(
        model=BUNDLED_MODEL_NAME, model_dir=model_dir, port=0, state_dir=state_dir, admin_key=ADMIN
    )
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    # Tenants are users: two users, a key each.
    tenant_a = openai.OpenAI(base_url=url, api_key=user_key(url, "tenant-a"), max_retries=0)
    tenant_b = openai.OpenAI(base_url=url, api_key=user_key(url, "tenant-b"), max_retries=0)
    try:
        num_tokens = len(app.state.engine.tokenize(system_prompt(0), add_special=False))
        ttft(tenant_a, system_prompt(-1), "warm-up")
        cold, warm, other = [], [], []
        for session in range(args.rounds):
            system = system_prompt(session)
            cold.append(ttft(tenant_a, system, f"Question {session}: when is my bill due?"))
            warm.append(ttft(tenant_a, system, f"Question {session}: can I pay by card?"))
            other.append(ttft(tenant_b, system, f"Question {session}: is there a late fee?"))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    cold_s, warm_s, other_s = (statistics.median(v) for v in (cold, warm, other))
    speedup = cold_s / warm_s
    is_isolated = other_s >= cold_s / 2
    print(f"system prompt: {num_tokens} tokens, {args.rounds} rounds, median TTFT")
    print(f"{'request':<34}{'TTFT ms':>10}")
    print(f"{'cold (new system prompt)':<34}{cold_s * 1000:>10.1f}")
    print(f"{'warm (cached prefix, same key)':<34}{warm_s * 1000:>10.1f}")
    print(f"{'other tenant (same prompt)':<34}{other_s * 1000:>10.1f}")
    print(f"speed-up cold/warm: {speedup:.1f}x (target >= {TARGET_SPEEDUP:g}x)")
    print(f"other tenant served cold: {'yes' if is_isolated else 'NO'}")
    return 0 if speedup >= TARGET_SPEEDUP and is_isolated else 1


if __name__ == "__main__":
    sys.exit(main())
