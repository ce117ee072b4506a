"""The embedder in process, over the served model's real session: where a request is tokenized
(a big one never on the event loop) and that it makes no difference to the vectors."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np

from mahir.model import Model
from mahir.outdir import open_output_dir
from mahir.serve.embeddings import INLINE_CHARACTERS, parse_embeddings
from mahir.serve.metrics import ServerMetrics
from mahir.serve.served import ServeConfig, ServedModel
from tests.serve.test_serve import sentences


def test_a_big_request_is_tokenized_on_a_thread_into_the_same_vectors(
    served_dir: Path, minilm: Model
) -> None:
    served = ServedModel(open_output_dir(served_dir), ServeConfig(), ServerMetrics())
    embedder = served.embedder
    assert embedder is not None
    threads: list[threading.Thread] = []
    encode = embedder.encode

    def recording(texts: Any) -> Any:
        threads.append(threading.current_thread())
        return encode(texts)

    embedder.encode = recording  # type: ignore[assignment]
    texts = sentences(minilm, 40, seed=5)
    assert sum(len(t) for t in texts) > INLINE_CHARACTERS > len(texts[0]) + len(texts[1])

    async def main() -> tuple[list[Any], list[threading.Thread], Any]:
        served.start()
        small = [await embedder.embed(parse_embeddings({"input": t})) for t in texts[:2]]
        on_small = threads[:]
        big = await embedder.embed(parse_embeddings({"input": texts}))
        await served.stop()
        return small, on_small, big

    small, on_small, (vectors, tokens) = asyncio.run(main())
    assert on_small == [threading.main_thread()] * 2  # small: on the event loop
    big_threads = threads[2:]
    assert len(big_threads) == 40
    assert all(t.name.startswith("mahir-tokenize") for t in big_threads)
    for (alone, _), vector in zip(small, vectors[:2], strict=True):
        np.testing.assert_allclose(vector, alone[0], atol=1e-5)
    assert tokens == int(minilm.family.tokenize(texts)["attention_mask"].sum())
