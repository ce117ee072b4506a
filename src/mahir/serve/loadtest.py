"""`mahir loadtest`: load on an inference server, closed- or open-loop, bounded in time and count.

Closed loop (`concurrency`): N clients, each sending its next request when the last answered;
it measures what the server sustains at that concurrency. Open loop (`rate`): requests start on
a fixed schedule whatever the answers do, as real traffic does; when the server falls behind,
latency grows instead of the load shrinking, which closed loops hide. Latency is measured from
the scheduled start, so queueing in the client counts too. Works against any server speaking
OpenAI-style `/v1/embeddings` or KServe v2 infer (mahir's, Infinity, Triton). Failed requests
are counted, never raised; `LoadResult.check` fails the run when they pass the allowed share,
since numbers measured on error answers (a wrong path, a dead server) measure nothing.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from rich.table import Table

from mahir.errors import BadInput, MahirError, refuse_below
from mahir.families.text import WORDS


class TooManyErrors(MahirError):
    """More requests failed than the run allows: its latencies describe error answers."""


@dataclass(frozen=True, slots=True)
class LoadConfig:
    url: str
    concurrency: int | None = None
    rate: float | None = None
    """Requests per second (open loop); exclusive with `concurrency`."""
    duration_s: float = 10.0
    max_requests: int | None = None
    endpoint: Literal["embeddings", "infer"] = "embeddings"
    model: str | None = None
    """Model name for the request (OpenAI `model`, or the v2 path segment); embeddings
    requests carry none when None."""
    sentences_per_request: int = 1
    seed: int = 0
    api_key: str | None = None
    max_error_rate: float = 0.01
    """Share of requests that may fail (any answer but 200, or no answer) before `check` fails."""

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadInput(
                f"{self.url!r} is not a server's address: give one such as http://127.0.0.1:8000"
            )
        if (self.concurrency is None) == (self.rate is None):
            raise BadInput("give exactly one of --concurrency (closed loop) or --rate (open loop)")
        counts = {
            "--concurrency": self.concurrency,
            "--requests": self.max_requests,
            "--sentences": self.sentences_per_request,
        }
        refuse_below(1, counts)
        refuse_below(0, {"--rate": self.rate, "--duration": self.duration_s}, above=True)
        if not 0 <= self.max_error_rate <= 1:
            raise BadInput(f"--max-error-rate is a share in [0, 1], got {self.max_error_rate}")
        if self.endpoint == "infer" and self.model is None:
            raise BadInput("--endpoint infer needs --model NAME: the model's path segment")


@dataclass
class LoadResult:
    config: LoadConfig
    latencies_ms: list[float] = field(default_factory=list)
    """Of successful requests only."""
    statuses: Counter[str] = field(default_factory=Counter)
    """HTTP status (or the transport error's name) -> count."""
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        ok = np.array(self.latencies_ms) if self.latencies_ms else np.array([np.nan])
        p50, p90, p99 = (float(x) for x in np.percentile(ok, [50, 90, 99]))
        total = sum(self.statuses.values())
        return {
            "url": self.config.url,
            "mode": "closed" if self.config.concurrency else "open",
            "concurrency": self.config.concurrency,
            "rate": self.config.rate,
            "requests": total,
            "ok": len(self.latencies_ms),
            "throughput": len(self.latencies_ms) / self.elapsed_s if self.elapsed_s else 0.0,
            "p50_ms": p50,
            "p90_ms": p90,
            "p99_ms": p99,
            "statuses": dict(self.statuses),
            "elapsed_s": self.elapsed_s,
        }

    def check(self) -> None:
        """Raise TooManyErrors, naming the statuses, when failures pass the allowed share."""
        total = sum(self.statuses.values())
        failed = total - self.statuses.get("200", 0)
        if total and failed <= self.config.max_error_rate * total:
            return
        seen = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()) if k != "200")
        raise TooManyErrors(
            f"{failed} of {total} requests failed ({seen or 'none sent'}), more than "
            f"--max-error-rate {self.config.max_error_rate:g} allows: check the URL, --endpoint "
            "and --model, and that the server is up"
        )

    def __rich__(self) -> Table:
        summary = self.summary()
        table = Table(title=f"{summary['mode']}-loop load on {self.config.url}")
        for column in ("requests", "ok", "req/s", "p50 ms", "p90 ms", "p99 ms", "statuses"):
            table.add_column(column, justify="right")
        table.add_row(
            str(summary["requests"]),
            str(summary["ok"]),
            f"{summary['throughput']:.1f}",
            f"{summary['p50_ms']:.2f}",
            f"{summary['p90_ms']:.2f}",
            f"{summary['p99_ms']:.2f}",
            ", ".join(f"{k}: {v}" for k, v in sorted(summary["statuses"].items())),
        )
        return table


def sentence_source(seed: int) -> Callable[[], str]:
    """Short-skewed generated sentences (median ~15 words), distinct per request."""
    rng = np.random.default_rng(seed)

    def next_sentence() -> str:
        words = int(min(120, max(3, rng.lognormal(2.7, 0.6))))
        return " ".join(WORDS[i] for i in rng.integers(len(WORDS), size=words)).capitalize() + "."

    return next_sentence


def _body(
    config: LoadConfig, sentence: Callable[[], str], rng: np.random.Generator
) -> tuple[str, dict[str, Any]]:
    """The path and JSON body of one request: sentences, or for v2 infer BERT-style token ids
    (a [CLS] ... [SEP] row per sentence, one id per word) for a server that does not tokenize."""
    texts = [sentence() for _ in range(config.sentences_per_request)]
    if config.endpoint == "embeddings":
        named = {"model": config.model} if config.model is not None else {}
        return "/v1/embeddings", {"input": texts, **named}
    ids = [[101, *rng.integers(1000, 20000, size=len(t.split())).tolist(), 102] for t in texts]
    longest = max(map(len, ids))
    padded = [row + [0] * (longest - len(row)) for row in ids]
    mask = [[1] * len(row) + [0] * (longest - len(row)) for row in ids]
    shape = [len(ids), longest]

    def tensor(name: str, rows: list[list[int]]) -> dict[str, Any]:
        return {
            "name": name,
            "shape": shape,
            "datatype": "INT64",
            "data": [v for row in rows for v in row],
        }

    inputs = [tensor("input_ids", padded), tensor("attention_mask", mask)]
    inputs.append(tensor("token_type_ids", [[0] * longest for _ in ids]))
    return f"/v2/models/{config.model}/infer", {"inputs": inputs}


async def run_load(
    config: LoadConfig, *, on_progress: Callable[[LoadResult], None] | None = None
) -> LoadResult:
    """Send the load; return every latency and status. Never raises on server errors. aiohttp,
    because a load generator must not be the bottleneck: httpx's pool is, past ~100 sockets."""
    import aiohttp

    result = LoadResult(config)
    sentence = sentence_source(config.seed)
    rng = np.random.default_rng(config.seed)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    sockets = config.concurrency or max(64, int((config.rate or 1) * 2))
    started = time.perf_counter()
    stop_at = started + config.duration_s
    sent = 0

    connector = aiohttp.TCPConnector(limit=sockets)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        config.url, connector=connector, timeout=timeout, headers=headers
    ) as session:

        async def one(scheduled: float) -> None:
            path, body = _body(config, sentence, rng)
            try:
                async with session.post(path, json=body) as response:
                    await response.read()
                    status = str(response.status)
            except (aiohttp.ClientError, TimeoutError) as err:
                status = type(err).__name__
            result.statuses[status] += 1
            if status == "200":
                result.latencies_ms.append((time.perf_counter() - scheduled) * 1e3)
            if on_progress is not None:
                on_progress(result)

        def more() -> bool:
            within = config.max_requests is None or sent < config.max_requests
            return within and time.perf_counter() < stop_at

        if config.concurrency:

            async def client_loop() -> None:
                nonlocal sent
                while more():
                    sent += 1
                    await one(time.perf_counter())

            await asyncio.gather(*(client_loop() for _ in range(config.concurrency)))
        else:
            interval = 1 / (config.rate or 1)
            tasks = []
            while more():
                scheduled = started + sent * interval
                await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
                sent += 1
                tasks.append(asyncio.create_task(one(scheduled)))
            await asyncio.gather(*tasks)
    result.elapsed_s = time.perf_counter() - started
    return result
