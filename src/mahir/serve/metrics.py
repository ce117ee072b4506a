"""Prometheus metrics of one server, in a registry of its own (no process-wide state, so two
servers in one process, as in tests, never mix their counts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mahir.serve.batcher import BatchObserver

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class HttpMetrics:
    """What every server counts: answers by endpoint and status, and their time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mahir_requests",
            "Requests answered, by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "mahir_request_seconds",
            "Time from request to response, by endpoint.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ServerMetrics(HttpMetrics):
    """The encoder server's: its batcher's queue, batches and inference time too."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.queue_time = Histogram(
            "mahir_queue_seconds",
            "Time a request waited for its batch to start.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mahir_batch_size", "Items per batch run.", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "mahir_batch_padded_tokens",
            "Tokens computed per batch: items x longest (the real ones for a packed session).",
            buckets=tuple(64 * 2**i for i in range(10)),
            registry=r,
        )
        self.inference = Histogram(
            "mahir_inference_seconds",
            "Time the runtime took per batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("mahir_queue_depth", "Items waiting for a batch.", registry=r)

    def observer(self) -> BatchObserver:
        def batch(items: int, tokens: int, seconds: float) -> None:
            self.batch_size.observe(items)
            self.batch_tokens.observe(tokens)
            self.inference.observe(seconds)

        return BatchObserver(
            queued=self.queue_depth.set, batch=batch, waited=self.queue_time.observe
        )
