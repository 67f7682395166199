"""The troubleshooting table's symptoms, read from two scrapes of a server's /metrics.

Gauges are read from the second scrape; counters and histograms are totals since the server
started (the CPU rate is the only difference between the scrapes). Each rule is one WARN at
most: a busy server is not a broken one. docs/troubleshooting.md explains every rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from aicc.config import Settings
from aicc.doctor.checks import CheckResult, passed, skipped, warned

QUEUE_WARN_RATIO = 0.5
"""Of max_queue; at max_queue new requests get 429."""
QUEUE_TIME_WARN_S = 1.0
KV_WARN_RATIO = 0.9
CPU_WARN_RATIO = 0.9
"""Of `threads` cores."""
GPU_WARN_RATIO = 0.95
ERROR_WARN_RATIO = 0.01
OVERLOAD_WARN_RATIO = 0.05
AUTH_WARN_RATIO = 0.1
MIN_CALLS = 20
"""Fewer calls than this since start are too few for a rate to mean anything."""
TTFT_WARN_S = 2.0
PREFIX_MIN_TOKENS = 10_000
PREFIX_WARN_RATIO = 0.05
AUDIT_WARN_S = 0.05
DOCS = "docs/troubleshooting.md"


class MetricSnapshot:
    """One scrape, by sample name (`aicc_requests_total`, `aicc_batch_size_sum`, ...)."""

    def __init__(self, text: str) -> None:
        """Raises ValueError when `text` is not the Prometheus text format."""
        self._samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self._samples.setdefault(sample.name, []).append((sample.labels, sample.value))

    def has(self, name: str) -> bool:
        return name in self._samples

    def total(self, name: str, predicate: Callable[[dict[str, str]], bool] | None = None) -> float:
        """Sum of the samples named `name` (whose labels satisfy `predicate`); 0 if none."""
        return sum(
            value
            for labels, value in self._samples.get(name, ())
            if predicate is None or predicate(labels)
        )

    def highest(self, name: str) -> float | None:
        values = [value for _, value in self._samples.get(name, ())]
        return max(values) if values else None

    def mean(self, histogram: str) -> tuple[float | None, float]:
        """(sum / count or None, count) of a histogram or summary."""
        count = self.total(f"{histogram}_count")
        return (self.total(f"{histogram}_sum") / count if count else None), count


@dataclass(frozen=True, slots=True)
class Scrapes:
    first: MetricSnapshot
    second: MetricSnapshot
    elapsed_s: float
    """Between the two scrapes."""
    settings: Settings | None
    """The server's settings as this machine's config describes them (limits to compare)."""


def symptom_checks(scrapes: Scrapes) -> list[CheckResult]:
    return [result for rule in _RULES for result in rule(scrapes)]


def _queue(s: Scrapes) -> Iterator[CheckResult]:
    waiting = s.second.total("aicc_requests_waiting")
    mean_wait, _ = s.second.mean("aicc_queue_time_seconds")
    max_queue = s.settings.max_queue if s.settings else None
    value = f"{waiting:.0f} waiting" + (f" (max_queue {max_queue})" if max_queue else "")
    if mean_wait is not None:
        value += f"; mean queue time {mean_wait:.2f} s since start"
    fix = f"saturated: add replicas or lower the load ({DOCS}: latency spikes)"
    if max_queue and waiting >= QUEUE_WARN_RATIO * max_queue:
        yield warned("server: queue", value, f"{fix}; at max_queue requests get 429")
    elif mean_wait is not None and mean_wait > QUEUE_TIME_WARN_S:
        yield warned("server: queue", value, fix)
    else:
        yield passed("server: queue", value)


def _batch(s: Scrapes) -> Iterator[CheckResult]:
    running = s.second.total("aicc_requests_running")
    mean_batch, _ = s.second.mean("aicc_batch_size")
    max_batch = s.settings.max_batch_size if s.settings else None
    value = f"{running:.0f} running" + (f" of max_batch_size {max_batch}" if max_batch else "")
    if mean_batch is not None:
        value += f"; mean batch {mean_batch:.1f} sequences per step"
    if max_batch and running >= max_batch:
        yield warned(
            "server: batch",
            value,
            "every slot is busy: raise max_batch_size if the KV cache and compute allow, "
            "or add replicas",
        )
    else:
        yield passed("server: batch", value)


def _kv_cache(s: Scrapes) -> Iterator[CheckResult]:
    if not s.second.has("aicc_kv_cache_usage_ratio"):
        yield skipped("server: kv cache", "no engine metrics (engine not started)")
        return
    usage = s.second.highest("aicc_kv_cache_usage_ratio") or 0.0
    preemptions = s.second.total("aicc_engine_preemptions_total")
    value = f"{usage:.0%} in use; {preemptions:.0f} preemptions since start"
    if usage > KV_WARN_RATIO or preemptions > 0:
        yield warned(
            "server: kv cache",
            value,
            "long prompts fill the KV cache: raise ctx_size (memory permitting), lower "
            "max_batch_size, or cap max_tokens",
        )
    else:
        yield passed("server: kv cache", value)


def _cpu(s: Scrapes) -> Iterator[CheckResult]:
    name = "aicc_process_cpu_seconds_total"
    if not (s.first.has(name) and s.second.has(name)) or s.elapsed_s <= 0:
        yield skipped("server: cpu", "the server does not report process CPU time")
        return
    busy = max(0.0, s.second.total(name) - s.first.total(name)) / s.elapsed_s
    value = f"{busy:.2f} cores busy over {s.elapsed_s:.1f} s"
    threads = s.settings.threads if s.settings else None
    if threads:
        value += f" (threads {threads})"
    if threads and busy >= CPU_WARN_RATIO * threads:
        yield warned(
            "server: cpu",
            value,
            "the CPU is saturated: add replicas or CPUs, or move the model to a GPU",
        )
    else:
        yield passed("server: cpu", value)


def _gpu(s: Scrapes) -> Iterator[CheckResult]:
    busiest = s.second.highest("aicc_gpu_utilization_ratio")
    if busiest is None:
        yield skipped("server: gpu", "no GPU metrics (a CPU server)")
    elif busiest >= GPU_WARN_RATIO:
        yield warned(
            "server: gpu", f"busiest GPU {busiest:.0%} utilised", "the GPU is saturated: add GPUs"
        )
    else:
        yield passed("server: gpu", f"busiest GPU {busiest:.0%} utilised")


def _errors(s: Scrapes) -> Iterator[CheckResult]:
    calls = s.second.total("aicc_requests_total")
    errors = s.second.total(
        "aicc_requests_total", lambda labels: labels.get("status", "").startswith("5")
    )
    value = f"{errors:.0f} of {calls:.0f} calls since start answered 5xx"
    if calls >= MIN_CALLS and errors > ERROR_WARN_RATIO * calls:
        yield warned(
            "server: errors", value, "read the server log (level error) for their request ids"
        )
    else:
        yield passed("server: errors", value)


def _overload(s: Scrapes) -> Iterator[CheckResult]:
    calls = s.second.total("aicc_requests_total")
    refused = s.second.total("aicc_requests_total", lambda labels: labels.get("status") == "429")
    limited = s.second.total("aicc_rate_limited_total")
    value = f"{refused:.0f} of {calls:.0f} calls got 429 ({limited:.0f} by rate limits or quotas)"
    if calls >= MIN_CALLS and refused > OVERLOAD_WARN_RATIO * calls:
        fix = (
            "raise the users' rate limits or quotas"
            if limited >= refused / 2
            else "the queue was full: add replicas, or raise max_queue if latency allows"
        )
        yield warned("server: overload", value, fix)
    else:
        yield passed("server: overload", value)


def _first_token(s: Scrapes) -> Iterator[CheckResult]:
    ttft, count = s.second.mean("aicc_time_to_first_token_seconds")
    if ttft is None:
        yield skipped("server: first token", "no generations yet")
        return
    value = f"mean time to first token {ttft:.2f} s over {count:.0f} requests"
    if ttft > TTFT_WARN_S:
        yield warned(
            "server: first token",
            value,
            f"prefill or queueing is slow: see {DOCS} (slow first token)",
        )
    else:
        yield passed("server: first token", value)


def _prefix_cache(s: Scrapes) -> Iterator[CheckResult]:
    if s.settings is not None and not s.settings.prefix_cache:
        yield skipped("server: prefix cache", "prefix_cache is off")
        return
    prompt = s.second.total("aicc_prompt_tokens_total")
    hits = s.second.total("aicc_prefix_cache_hit_tokens_total")
    ratio = hits / prompt if prompt else 0.0
    value = f"{hits:.0f} of {prompt:.0f} prompt tokens ({ratio:.0%}) came from the prefix cache"
    if prompt >= PREFIX_MIN_TOKENS and ratio < PREFIX_WARN_RATIO:
        yield warned(
            "server: prefix cache",
            value,
            "put shared text (system prompt, tools) first and byte-identical; "
            "prefix_cache_scope: global only if all callers trust each other",
        )
    else:
        yield passed("server: prefix cache", value)


def _audit(s: Scrapes) -> Iterator[CheckResult]:
    mean_write, count = s.second.mean("aicc_audit_write_seconds")
    if mean_write is None:
        yield skipped("server: audit", "no audit commits yet")
        return
    value = f"mean audit commit {mean_write * 1000:.1f} ms over {count:.0f} batches"
    if mean_write > AUDIT_WARN_S:
        yield warned(
            "server: audit",
            value,
            "slow state disk or database: move state_dir to a faster disk, or use PostgreSQL",
        )
    else:
        yield passed("server: audit", value)


def _auth(s: Scrapes) -> Iterator[CheckResult]:
    calls = s.second.total("aicc_requests_total")
    denied = s.second.total("aicc_auth_denied_total")
    value = f"{denied:.0f} of {calls:.0f} calls refused with 401/403 since start"
    if calls >= MIN_CALLS and denied > AUTH_WARN_RATIO * calls:
        yield warned(
            "server: auth",
            value,
            f"expired, revoked or mistyped keys, or missing permissions: see {DOCS} "
            "(auth failures) and the audit log",
        )
    else:
        yield passed("server: auth", value)


def _is_server_error(labels: dict[str, str]) -> bool:
    return labels.get("status", "").startswith("5")


_RULES: tuple[Callable[[Scrapes], Iterator[CheckResult]], ...] = (
    _queue,
    _batch,
    _kv_cache,
    _cpu,
    _gpu,
    _errors,
    _overload,
    _first_token,
    _prefix_cache,
    _audit,
    _auth,
)
