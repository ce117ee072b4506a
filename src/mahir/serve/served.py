"""The served model: one output directory's session behind a batcher, the checks its inputs
must pass, and for sentence encoders the embedder; with the server's settings and metrics, all
that the HTTP handlers (`app.py`) read. Knows nothing of HTTP.

Opens nothing itself (`outdir.py` did); never imports passes or search.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mahir.errors import BadInput
from mahir.families.tensor import random_inputs
from mahir.families.text import Text
from mahir.outdir import OutputDir
from mahir.runtimes.buckets import token_outputs
from mahir.serve.batcher import Batcher, BatcherConfig
from mahir.serve.embeddings import Embedder
from mahir.serve.images import ImageCodec
from mahir.serve.metrics import ServerMetrics
from mahir.serve.validate import InputRules
from mahir.types import BATCH, SEQUENCE


@dataclass(frozen=True, slots=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Loopback by default; binding to other interfaces must be asked for."""
    port: int = 8000
    api_key: str | None = None
    """When set, the model endpoints need `Authorization: Bearer <key>`."""
    max_body_bytes: int = 8 * 2**20
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    truncate: bool = True
    """/v1/embeddings cuts inputs past the model's max length (False: refuses them, 400);
    a request's own `truncate` wins."""
    matryoshka_dims: tuple[int, ...] = ()
    """Shorter embedding sizes the model was trained to be cut to; /v1/embeddings honours
    `dimensions` for these and the native size only."""
    slots: int | None = None
    """An LLM's requests decoded together by an engine mahir batches by slots; None: what its
    output directory records."""


class ServedModel:
    """The served model: its session behind a batcher, the checks its inputs must pass, and
    for sentence encoders the embedder."""

    def __init__(self, opened: OutputDir, config: ServeConfig, metrics: ServerMetrics):
        self.config, self.metrics, self.started = config, metrics, False
        self.opened = opened
        self.name = opened.name
        spec = opened.spec
        sequence = spec.sequence_inputs
        self.token_outputs = token_outputs(opened.session, spec)
        text = opened.family if isinstance(opened.family, Text) else None
        self.rules = InputRules.for_model(spec, text.limits if text else None)
        probe = random_inputs(spec, {BATCH: 1, SEQUENCE: 4}, np.random.default_rng(0))
        self.batcher = Batcher(
            opened.session,
            config.batcher,
            sequence_inputs=sequence,
            token_outputs=self.token_outputs,
            observer=metrics.observer(),
            probe=probe,
        )
        self.images = ImageCodec.of(opened.family, self.batcher.check_admission)
        self.embedder: Embedder | None = None
        embeds = text is not None and text.pooling is not None and text.max_length is not None
        if config.matryoshka_dims and not embeds:
            raise BadInput(f"--matryoshka-dims: {self.name} is not a sentence encoder; drop it")
        if embeds:
            native = opened.session.run(probe)[spec.outputs[0]].shape[-1]
            self.embedder = Embedder(
                opened,
                self.batcher,
                self.rules,
                native=native,
                dimensions=config.matryoshka_dims,
                truncate=config.truncate,
            )

    @property
    def ready(self) -> bool:
        """Started, and the session answered its probe after its last failure."""
        return self.started and self.batcher.healthy

    def start(self) -> None:
        """Start batching; on the event loop that will serve."""
        self.batcher.start()
        self.started = True

    async def stop(self) -> None:
        """Answer not ready, then run every admitted request and stop."""
        self.started = False
        await self.batcher.stop()
        if self.embedder is not None:
            self.embedder.close()
