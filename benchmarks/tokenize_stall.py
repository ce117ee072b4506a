"""How long tokenizing one /v1/embeddings request holds the event loop, on the loop and on a
thread: the reason `Embedder` sends requests past `INLINE_CHARACTERS` to a thread.

One request of N generated sentences is tokenized as the embedder does it (the default model's
tokenizer, one call per text) while a ticker task on the same loop wakes every 0.5 ms and
records the longest gap between its wake-ups: the stall every other request would see. Median
of 5 trials per size and place.

    PYTHONPATH=src .venv/bin/python benchmarks/tokenize_stall.py
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mahir.families.text import TextEncoder, generate_sentences
from mahir.hardware import detect
from mahir.model import load_model


async def ticker(gaps: list[float], stop: asyncio.Event) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.0005)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


async def trial(work: object, thread: ThreadPoolExecutor | None) -> tuple[float, float]:
    """Seconds the request took, and the loop's longest stall meanwhile."""
    gaps: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(gaps, stop))
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    if thread is None:
        work()  # type: ignore[operator]
    else:
        await asyncio.get_running_loop().run_in_executor(thread, work)  # type: ignore[arg-type]
    took = time.perf_counter() - started
    stop.set()
    await tick
    return took, max(gaps)


async def main() -> None:
    model = load_model()
    text = model.family
    encode = TextEncoder(text.tokenizer, text.spec, text.max_length)  # type: ignore[attr-defined]
    texts = generate_sentences(1024, text.tokenizer, np.random.default_rng(0))
    thread = ThreadPoolExecutor(max_workers=1)
    print(detect().summary(), time.strftime("%Y-%m-%d"))
    for count in (1, 8, 64, 256, 1024):
        chars = sum(len(t) for t in texts[:count])
        for where, pool in (("event loop", None), ("thread", thread)):

            def work(count: int = count) -> None:
                for t in texts[:count]:
                    encode([t])

            took, stall = np.median([await trial(work, pool) for _ in range(5)], axis=0)
            print(
                f"{count:5d} sentences ({chars:6d} characters) on the {where:10}: request "
                f"{took * 1e3:7.2f} ms, longest event-loop stall {stall * 1e3:7.2f} ms"
            )
    thread.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
