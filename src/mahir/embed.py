"""Sentence embeddings for a corpus: tokenizing on the host while the device computes.

On a GPU, a batch of 256 short sentences runs in a millisecond or two, about what tokenizing it
takes; run one after the other, the device idles half the time. Here the next batches are
tokenized on a worker thread while the current one runs. Sentences go in
order of length, so that a padded batch holds similar lengths (a packed session computes no
padding either way), and the embeddings come back in the caller's order.

The host is then the bound: on the H200's 16-core host, tokenizing 4,096 short sentences takes
78 ms on one thread and embedding them end to end 79 ms. More `workers` tokenize several batches
at once (57 ms on four threads), but the tokenizer and the thread feeding the GPU then contend
for the GIL and the whole took 85-89 ms; worker processes were slower still there (136 ms on
four: pipes are costly in that sandbox). One worker is the default; measure before raising it.
Those numbers are the Rust tokenizer's full pipeline. `TextEncoder.for_device` picks the
tokenizer for the session's device: on a GPU a lean copy of the Rust pipeline for BERT's plain
text (49.4 ms end to end on an H100 host, 2026-12-06), not the Python one that is fastest on
a CPU but holds the GIL the feeding thread needs (68.4 ms there).

Since BERT's plain text is tokenized a batch at a time (1.7x faster in Python), tokenizing is
no longer the bound there: 21-27 ms on two H100 hosts, and feeding the GPU 31-39 ms more.
`workers=0` tokenizes each batch on the calling thread, so no thread waits for the GIL: on one
host it beat a tokenizing thread (65.6 against 72.2-73.9 ms), on another, with Python's switch
interval at 0.2 ms, it lost (52.7 against 48.5-48.9 ms; README, "Variable-length text").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from mahir.errors import BadInput
from mahir.pooling import EMBEDDING
from mahir.runtimes.pending import overlapped
from mahir.types import Inputs, Session

AHEAD = 2
"""Batches tokenized ahead of the one running, per worker."""


def embed(
    texts: Sequence[str],
    session: Session,
    encode: Callable[[Sequence[str]], Inputs],
    *,
    batch_size: int = 256,
    workers: int | None = None,
) -> np.ndarray:
    """The sentence embedding of every text, in order: `encode` tokenizes a list of texts
    for `session` (e.g. a `TextEncoder`) on `workers` threads (0: on the calling thread, one
    batch after another), and the session's output "sentence_embedding" is kept. By default
    the calling thread tokenizes where the session queues batches (a CUDA-graph session: the
    device computes meanwhile) and one worker thread does elsewhere."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers is None:
        workers = 0 if hasattr(session, "submit") else 1
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    order = np.argsort([len(t) for t in texts], kind="stable")
    ordered = [texts[i] for i in order.tolist()]
    parts = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    out: np.ndarray | None = None
    with ThreadPoolExecutor(max(workers, 1), thread_name_prefix="mahir-tokenize") as pool:
        batches = _ahead(pool, encode, parts, AHEAD * workers) if workers else map(encode, parts)
        for start, outputs in zip(
            range(0, len(texts), batch_size), overlapped(session, batches), strict=True
        ):
            if EMBEDDING not in outputs:
                raise BadInput(
                    f"the session answers {sorted(outputs)}, not {EMBEDDING}: embed a directory "
                    "whose model pools inside (PoolInModel or PackSequences)"
                )
            embedding = outputs[EMBEDDING]
            if out is None:
                out = np.empty((len(texts), embedding.shape[1]), embedding.dtype)
            out[order[start : start + batch_size]] = embedding  # straight to the caller's order
    return out if out is not None else np.zeros((0, 0), np.float32)


def _ahead(
    pool: ThreadPoolExecutor,
    encode: Callable[[Sequence[str]], Inputs],
    parts: list[list[str]],
    ahead: int,
) -> Iterator[Inputs]:
    """The tokenized batches in turn, each submitted `ahead` batches before it is needed."""
    pending: list[Future[Inputs]] = [pool.submit(encode, part) for part in parts[:ahead]]
    for index in range(len(parts)):
        following = index + ahead
        if following < len(parts):
            pending.append(pool.submit(encode, parts[following]))
        yield pending[index].result()
