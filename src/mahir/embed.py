"""Sentence embeddings for a corpus: tokenizing on the host while the device computes.

On a GPU, a batch of 256 short sentences runs in a millisecond or two, about what tokenizing it
takes; run one after the other, the device idles half the time. So the two overlap. Sentences
go in order of length, so that a padded batch holds similar lengths (a packed session computes
no padding either way), and the embeddings come back in the caller's order. The longest go
first: what does not overlap is the first batch's tokenizing and the last batch's computing,
and a long batch costs the device more than the host (34.2 against 36.0 ms for the workload
below, in one run on an H100 host).

Where the session queues batches (`submit`: CUDA graphs, `runtimes/pending.py`), the calling
thread tokenizes the next batch and queues it before it waits for the current one: the GPU
computes meanwhile and no second thread contends for the GIL. 4,096 sentences through MiniLM
packed fp16 on an H100 host (2026-12-06) took 40.0 ms so, against 56.3 ms waiting for each batch
before tokenizing the next, 41.8 ms with a tokenizing thread, and 42.3 ms with the lean Rust
tokenizer on a thread (README, "Variable-length text"). Elsewhere (a CPU runtime, which computes
in `run`) a worker thread tokenizes ahead while `run` works without the GIL. More `workers`
tokenize several batches at once; with the Rust tokenizer on the H200's host they contended for
the GIL and lost (85-89 ms against 79 on one, 2026-12-03), and worker processes were slower
still there (pipes are costly in that sandbox): measure before raising it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from mahir.errors import BadInput
from mahir.pooling import EMBEDDING
from mahir.runtimes.pending import overlapped, queues
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
        workers = 0 if queues(session) else 1
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    order = np.argsort([-len(t) for t in texts], kind="stable")  # the longest first
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
