"""Prometheus metrics named like vLLM's (`vllm:` becomes `tuneops:`), labelled by model and version.

Each app owns its registry, so several gateways (tests, benchmarks) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
LABELS = ("model_name", "version")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.time_to_first_token = Histogram(
            "tuneops:time_to_first_token_seconds",
            "Arrival to first generated token.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "tuneops:inter_token_latency_seconds",
            "Time between consecutive tokens of one choice.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            "tuneops:e2e_request_latency_seconds",
            "Arrival to last token of the request.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_queue_time = Histogram(
            "tuneops:request_queue_time_seconds",
            "Time a request waited before joining the batch.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.num_requests_running = Gauge("tuneops:num_requests_running", "Requests in the running batch.", registry=r)
        self.num_requests_waiting = Gauge("tuneops:num_requests_waiting", "Requests queued for the batch.", registry=r)
        self.prompt_tokens = Counter("tuneops:prompt_tokens", "Prefilled prompt tokens.", LABELS, registry=r)
        self.generation_tokens = Counter("tuneops:generation_tokens", "Generated tokens.", LABELS, registry=r)
        self.request_success = Counter(
            "tuneops:request_success", "Requests that finished.", (*LABELS, "finished_reason"), registry=r
        )
        self.request_errors = Counter(
            "tuneops:request_errors", "Requests that failed, by error code.", (*LABELS, "code"), registry=r
        )
        self.adapter_loads = Counter(
            "tuneops:adapter_loads",
            "Adapter loads (with warm-up check) by outcome.",
            (*LABELS, "outcome"),
            registry=r,
        )
        self.promotions = Counter(
            "tuneops:alias_switches",
            "Alias switches to a new version, by outcome.",
            ("model_name", "alias", "outcome"),
            registry=r,
        )
        self.served_version = Gauge(
            "tuneops:served_version",
            "Version each watched alias currently serves.",
            ("model_name", "alias"),
            registry=r,
        )
        self.alias_behind = Gauge(
            "tuneops:alias_behind",
            "1 while the version a watched alias points at failed to load and is retried; the alias serves "
            "the version it had, if any.",
            ("model_name", "alias"),
            registry=r,
        )
        self.num_failed_versions = Gauge(
            "tuneops:num_failed_versions", "Versions whose last load failed, waiting for their next try.", registry=r
        )
        self.traces_written = Counter(
            "tuneops:traces_written", "Request traces written to MLflow.", ("model_name",), registry=r
        )
        self.traces_dropped = Counter(
            "tuneops:traces_dropped",
            "Request traces not written: buffer_full (the tracking server fell behind) or write_failed.",
            ("model_name", "reason"),
            registry=r,
        )
        self.traces_queued = Gauge(
            "tuneops:traces_queued", "Request traces waiting to be written or being written.", registry=r
        )
        self.ready = Gauge("tuneops:ready", "1 when the gateway is ready to serve.", registry=r)
