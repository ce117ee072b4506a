"""The batcher against a device that takes a fixed time per batch: requests a second through one
worker, and how long the device sits idle between batches while clients wait (host work it
waited for: the answers, the next batch's choice and merge, the hand-off between threads).

No model and no HTTP: the session sleeps `--device-ms` per batch whatever its size (a GPU at
these sizes is launch-bound: BERT-base ran 4-5 ms at batch 1 on the H200, see the README) with
the GIL free, as a CUDA session's device time would leave it, and answers zeros shaped like a
sentence encoder's token outputs. Requests are generated sentences tokenized by the default
model's tokenizer, one per request, sent by `--concurrency` clients in a closed loop (the
server under load: several batches' worth waiting). Run it on two checkouts (`PYTHONPATH=src`)
to compare batchers, alternating, more than once: the machine's noise is of the same order.

    PYTHONPATH=src .venv/bin/python benchmarks/batcher_overlap.py --device-ms 2 --concurrency 1024
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import numpy as np

from mahir.families.text import generate_sentences
from mahir.hardware import detect
from mahir.model import load_model
from mahir.serve.batcher import Batcher, BatcherConfig


class FixedTimeDevice:
    runtime = "sleep"

    def __init__(self, seconds: float, hidden: int, packed: bool) -> None:
        self.seconds, self.hidden, self.packed = seconds, hidden, packed
        self.batches = 0
        self.gaps: list[float] = []
        """Idle time of the device between one batch's end and the next one's start."""
        self._ended: float | None = None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        if self._ended is not None:
            self.gaps.append(started - self._ended)
        time.sleep(self.seconds)
        self._ended = time.perf_counter()
        self.batches += 1
        rows, length = inputs["input_ids"].shape
        return {"last_hidden_state": np.zeros((rows, length, self.hidden), np.float32)}

    def describe(self) -> dict[str, Any]:
        return {}


async def throughput(
    requests: list[dict[str, np.ndarray]],
    config: BatcherConfig,
    device: FixedTimeDevice,
    concurrency: int,
) -> tuple[float, float]:
    """Requests a second, and the process's CPU seconds per request."""
    batcher = Batcher(
        device,
        config,
        sequence_inputs=frozenset(requests[0]),
        token_outputs=frozenset({"last_hidden_state"}),
    )
    batcher.start()
    pending = iter(requests)

    async def client() -> None:
        for inputs in pending:  # each client sends its next request when answered
            await batcher.submit(inputs)

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    await batcher.stop()
    return len(requests) / seconds, cpu / len(requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--device-ms", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=1024)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--max-batch-tokens", type=int, default=16_384)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--packed", action="store_true", help="the session declares packed")
    args = parser.parse_args()
    model = load_model()
    texts = generate_sentences(args.requests, model.family.tokenizer, np.random.default_rng(0))
    requests = [model.family.tokenize([t]) for t in texts]  # type: ignore[attr-defined]
    config = BatcherConfig(
        max_batch_size=args.max_batch_size,
        max_batch_tokens=args.max_batch_tokens,
        max_queue=args.requests,
        timeout_ms=600_000,
    )
    device = FixedTimeDevice(args.device_ms / 1000, args.hidden, args.packed)
    rate, cpu = asyncio.run(throughput(requests, config, device, args.concurrency))
    device_bound = args.requests / device.batches / (args.device_ms / 1000)
    result = {
        "machine": detect().summary(),
        "date": time.strftime("%Y-%m-%d"),
        "concurrency": args.concurrency,
        "packed": args.packed,
        "requests_per_s": round(rate),
        "cpu_us_per_request": round(cpu * 1e6, 1),
        "batches": device.batches,
        "items_per_batch": round(args.requests / device.batches, 1),
        "device_bound_requests_per_s": round(device_bound),
        "device_busy": round(device.batches * args.device_ms / 1000 * rate / args.requests, 3),
        "gap_ms_p50": round(float(np.median(device.gaps)) * 1000, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
