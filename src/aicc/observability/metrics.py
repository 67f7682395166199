"""Prometheus metrics (prefix `aicc_`): one `Metrics` object per app, on `app.state.metrics`.

Per-call metrics are counted by `observe_call` when the recording middleware finishes a call.
Engine, limiter, process and GPU state is read when Prometheus scrapes (`render`): each engine
thread only appends one `StepSample` per step to a bounded buffer, drained here. Every loaded
model's engine is bound under its served name (`bind_model`/`unbind_model`).

Model metrics carry `model` and `variant` labels; `variant` is a deployment's variant that
served the call ("" for models served directly, and for engine-step metrics). A call's model
label is its model only when that is a bound (served) model or a deployment, so clients naming
arbitrary models cannot grow the label set.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from aicc.api.record import CallOutcome, CallRecord
from aicc.engine.interface import EngineClient
from aicc.errors import AiccError, RateLimitedError
from aicc.observability.gpu import GpuReader, gpu_metric_families
from aicc.quota import RateLimiter

MODEL_LABELS = ("model", "variant")
CALL_LABELS = ("model", "variant", "route", "method", "status")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TOKEN_GAP_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1,
)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
AUDIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


@dataclass(frozen=True, slots=True)
class _ModelSeries:
    """The children of one (model, variant), resolved once: `labels()` is the costly part."""

    ttft: Histogram
    tpot: Histogram
    queue: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    rate_limited: Counter
    batch_size: Histogram
    step_seconds: Histogram


class Metrics:
    """Owns its registry (never the process-global one, so apps and tests stay apart)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, gpu: GpuReader | None = None
    ) -> None:
        """`gpu`: a reader to use instead of opening NVML in `bind` (tests)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "aicc_requests", "HTTP calls by route, method and status.", CALL_LABELS, registry=r
        )
        self._duration = Histogram(
            "aicc_request_duration_seconds",
            "End-to-end latency of HTTP calls (to the last response byte).",
            CALL_LABELS[:-1],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._ttft = Histogram(
            "aicc_time_to_first_token_seconds",
            "From the request's arrival to its first generated token.",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._tpot = Histogram(
            "aicc_time_per_output_token_seconds",
            "Mean gap between a request's generated tokens after the first.",
            MODEL_LABELS,
            buckets=TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self._queue = Histogram(
            "aicc_queue_time_seconds",
            "Time a request waited for a batch slot before its prompt was computed.",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._prompt_tokens = Counter(
            "aicc_prompt_tokens", "Prompt tokens of finished requests.", MODEL_LABELS, registry=r
        )
        self._generation_tokens = Counter(
            "aicc_generation_tokens", "Tokens generated.", MODEL_LABELS, registry=r
        )
        self._rate_limited = Counter(
            "aicc_rate_limited",
            "Requests refused by a user's or key's rate limit or quota.",
            MODEL_LABELS,
            registry=r,
        )
        self._auth_denied = Counter(
            "aicc_auth_denied",
            "Calls refused for a missing or invalid credential (401) or permission (403).",
            ("route", "status"),
            registry=r,
        )
        self._batch_size = Histogram(
            "aicc_batch_size",
            "Sequences per engine step.",
            MODEL_LABELS,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self._step_seconds = Histogram(
            "aicc_engine_step_seconds",
            "Wall time of one engine step (decode and sampling).",
            MODEL_LABELS,
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self._audit_write = Histogram(
            "aicc_audit_write_seconds",
            "Time of one audit batch commit.",
            buckets=AUDIT_BUCKETS,
            registry=r,
        )
        self._audit_records = Counter("aicc_audit_records", "Audit entries committed.", registry=r)
        self._feedback = Counter(
            "aicc_feedback",
            "Ratings of calls by their users (POST /v1/feedback): a call's first rating and each "
            "change of it count once, under the new rating.",
            (*MODEL_LABELS, "rating"),
            registry=r,
        )
        ProcessCollector(namespace="aicc", registry=r)
        r.register(_ScrapeCollector(self))
        self.engines: dict[str, EngineClient] = {}
        """Loaded models' engines by served name, read at each scrape."""
        self.limiter: RateLimiter | None = None
        self.gpu = gpu
        self._known_models: set[str] = set()
        self._series: dict[tuple[str, str], _ModelSeries] = {}
        self._call_children: dict[tuple[str, str, str, str, int], tuple[Counter, Histogram]] = {}

    def bind(self, engine: EngineClient | None, limiter: RateLimiter | None, model: str) -> None:
        """Read `limiter`, and `engine` as served model `model`, at each scrape from now on
        (None: stop reading it). Opens NVML the first time (no GPU: no GPU metrics)."""
        self.limiter = limiter
        if engine is not None:
            self.bind_model(model, engine)
        else:
            self.unbind_model(model)
        if model:
            self._known_models.add(model)
        if self.gpu is None:
            self.gpu = GpuReader.open()

    def bind_model(self, model: str, engine: EngineClient) -> None:
        """Read `engine` at each scrape under the label `model` (a loaded model)."""
        self.engines[model] = engine
        if model:
            self._known_models.add(model)

    def add_model_label(self, model: str) -> None:
        """Count calls naming `model` under its name (a deployment's public name)."""
        self._known_models.add(model)

    def unbind_model(self, model: str) -> None:
        """Stop reading the engine of `model` (unloaded); its last step samples are kept.
        Its name stays a known label: calls naming it after the unload still count under it."""
        engine = self.engines.pop(model, None)
        if engine is not None:
            self._drain_engine(model, engine)

    def close(self) -> None:
        """Release NVML."""
        if self.gpu is not None:
            self.gpu.close()
            self.gpu = None

    def observe_call(self, record: CallRecord, outcome: CallOutcome) -> None:
        """Count one finished HTTP call (runs on the event loop, once per call: kept cheap)."""
        model = record.model if record.model in self._known_models else ""
        variant = _variant(record) if model else ""
        key = (model, variant, outcome.route, outcome.method, outcome.status)
        children = self._call_children.get(key)
        if children is None:
            labels = (model, variant, outcome.route, outcome.method)
            children = (
                self._requests.labels(*labels, str(outcome.status)),
                self._duration.labels(*labels),
            )
            self._call_children[key] = children
        children[0].inc()
        children[1].observe(outcome.latency_s)
        if outcome.status in (401, 403):
            self._auth_denied.labels(outcome.route, str(outcome.status)).inc()
        series = self._model_series(model, variant)
        if outcome.status == 429 and record.error_code in (None, RateLimitedError.code):
            series.rate_limited.inc()
        if record.num_prompt_tokens:
            series.prompt_tokens.inc(record.num_prompt_tokens)
        if record.num_completion_tokens:
            series.generation_tokens.inc(record.num_completion_tokens)
        if (ttft := record.time_to_first_token_s) is not None:
            series.ttft.observe(ttft)
        if (tpot := record.time_per_output_token_s) is not None:
            series.tpot.observe(tpot)
        if record.queue_time_s is not None:
            series.queue.observe(record.queue_time_s)

    def observe_feedback(self, model: str, variant: str, rating: str) -> None:
        """Count one new or changed rating (`positive`/`negative`) of a call to `model`."""
        if model not in self._known_models:  # clients cannot grow the label set
            model = variant = ""
        self._feedback.labels(model, variant, rating).inc()

    def observe_audit_commit(self, seconds: float, num_records: int) -> None:
        """One audit batch committed (the audit log's `on_commit`; may run on any thread)."""
        self._audit_write.observe(seconds)
        self._audit_records.inc(num_records)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition (format 0.0.4) and its content type."""
        self._drain_steps()
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    # -- helpers ---------------------------------------------------------------------------
    def _drain_steps(self) -> None:
        for model, engine in list(self.engines.items()):
            self._drain_engine(model, engine)

    def _drain_engine(self, model: str, engine: EngineClient) -> None:
        series = self._model_series(model)
        for sample in engine.drain_step_samples():
            series.batch_size.observe(sample.batch_size)
            series.step_seconds.observe(sample.duration_s)

    def _model_series(self, model: str, variant: str = "") -> _ModelSeries:
        series = self._series.get((model, variant))
        if series is None:
            labels = (model, variant)
            series = _ModelSeries(
                ttft=self._ttft.labels(*labels),
                tpot=self._tpot.labels(*labels),
                queue=self._queue.labels(*labels),
                prompt_tokens=self._prompt_tokens.labels(*labels),
                generation_tokens=self._generation_tokens.labels(*labels),
                rate_limited=self._rate_limited.labels(*labels),
                batch_size=self._batch_size.labels(*labels),
                step_seconds=self._step_seconds.labels(*labels),
            )
            self._series[(model, variant)] = series
            for rating in ("positive", "negative"):  # exported at 0 from the first call on
                self._feedback.labels(model, variant, rating)
        return series


class _ScrapeCollector:
    """Gauges read at scrape time from the engine, the rate limiter and NVML."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # names vary with what is bound; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        yield from _engine_metrics(list(metrics.engines.items()))
        limiter = metrics.limiter
        if limiter is not None:
            stats = limiter.stats()
            yield _gauge(
                "aicc_rate_limiter_streams", "Requests holding a stream slot.", stats.num_streams
            )
            yield _gauge(
                "aicc_rate_limiter_subjects",
                "Users and keys tracked by the rate limiter.",
                stats.num_subjects,
            )
        if metrics.gpu is not None:
            yield from gpu_metric_families(metrics.gpu.read())


def _variant(record: CallRecord) -> str:
    """The deployment variant that served the call ("" when none did)."""
    variant = record.detail.get("variant") if record.detail else None
    return variant if isinstance(variant, str) else ""


def _engine_metrics(engines: list[tuple[str, EngineClient]]) -> Iterator[Metric]:
    """One family per metric, one sample per loaded model."""
    running = _model_gauge("aicc_requests_running", "Sequences in the batch.")
    waiting = _model_gauge("aicc_requests_waiting", "Sequences queued.")
    kv_usage = _model_gauge(
        "aicc_kv_cache_usage_ratio",
        "Fraction of KV cache cells in use (running sequences and cached prefixes).",
    )
    preemptions = CounterMetricFamily(
        "aicc_engine_preemptions",
        "Sequences sent back to the queue for lack of KV cache.",
        labels=MODEL_LABELS,
    )
    hits = CounterMetricFamily(
        "aicc_prefix_cache_hit_tokens",
        "Prompt tokens taken from the prefix cache instead of computed.",
        labels=MODEL_LABELS,
    )
    num_read = 0
    for model, engine in engines:
        try:
            stats = engine.stats()
        except AiccError:
            continue  # stopped or not started: no engine gauges rather than a failed scrape
        num_read += 1
        labels = [model, ""]
        usage = stats.kv_cells_used / stats.kv_cells_total if stats.kv_cells_total else 0.0
        running.add_metric(labels, stats.num_running)
        waiting.add_metric(labels, stats.num_waiting)
        kv_usage.add_metric(labels, usage)
        preemptions.add_metric(labels, stats.num_preemptions)
        hits.add_metric(labels, stats.num_prefix_hit_tokens)
    if num_read:
        yield from (running, waiting, kv_usage, preemptions, hits)


def _model_gauge(name: str, documentation: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=MODEL_LABELS)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
