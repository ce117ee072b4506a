"""Prometheus metrics of one server, in a registry of its own (no process-wide state, so two
servers in one process, as in tests, never mix their counts)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mahir.serve.batcher import BatchObserver
from mahir.serve.llm_scheduler import LlmObserver

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


class LlmMetrics(HttpMetrics):
    """The LLM server's: what users feel (time to first token, time between tokens) and what
    the scheduler holds (sequences generating and waiting)."""

    def __init__(self, kv_cache_usage: Callable[[], float | None] | None = None) -> None:
        """`kv_cache_usage`: the engine's share of its KV cache in use, where it reports one
        (vLLM): a gauge read at each scrape."""
        super().__init__()
        r = self.registry
        if kv_cache_usage is not None:
            kv_cache = Gauge(
                "mahir_llm_kv_cache_usage",
                "Share of the engine's KV cache in use (0-1), as of its last step with work.",
                registry=r,
            )
            kv_cache.set_function(lambda: kv_cache_usage() or 0.0)
        self.first_token = Histogram(
            "mahir_llm_time_to_first_token_seconds",
            "Time from a request's arrival to its first token (queueing and prefill).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "mahir_llm_inter_token_seconds",
            "Time between consecutive tokens of one sequence (a decode step).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.output_tokens = Counter("mahir_llm_output_tokens", "Tokens generated.", registry=r)
        self.prompt_tokens = Counter("mahir_llm_prompt_tokens", "Prompt tokens read.", registry=r)
        self.prompt_cached = Counter(
            "mahir_llm_prompt_tokens_cached",
            "Prompt tokens the engine read from its prefix cache rather than prefilled.",
            registry=r,
        )
        self.running = Gauge("mahir_llm_running", "Sequences generating now.", registry=r)
        self.waiting = Gauge("mahir_llm_waiting", "Sequences waiting for a slot.", registry=r)

    def observer(self) -> LlmObserver:
        def counts(running: int, waiting: int) -> None:
            self.running.set(running)
            self.waiting.set(waiting)

        def first_token(seconds: float) -> None:
            self.first_token.observe(seconds)
            self.output_tokens.inc()

        def next_token(seconds: float) -> None:
            self.inter_token.observe(seconds)
            self.output_tokens.inc()

        return LlmObserver(
            counts=counts,
            first_token=first_token,
            next_token=next_token,
            prompt_cached=self.prompt_cached.inc,
        )
