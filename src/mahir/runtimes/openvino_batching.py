"""Continuous batching for OpenVINO GenAI: concurrent streams as requests of one
`ContinuousBatchingPipeline`, which schedules them step by step over its paged KV cache.

The invariant: the loop's thread is the only one that touches the pipeline. A joining request
is added (`add_request`, its ids and its own `GenerationConfig`) and gets a handle; each step is
one `pipeline.step()`, GenAI's scheduler deciding which prompts it prefills (in chunks) and
which sequences it decodes; then every row reads the tokens its handle has ready and hands
them to its consumer. A row whose consumer left is dropped (`handle.drop()`), which frees its
KV blocks; a row whose request GenAI ended (its stop token, `max_new_tokens`, or a failure)
leaves. Sampling is GenAI's own, seeded per request as `openvino_genai.generation_config`
sets it, so a stream's tokens are the pipeline's for that request whatever runs beside it (up
to a batched matmul's rounding).

Measured on SmolLM2-135M int8 with the CPU plugin's own precisions, 2-core AMD EPYC, 48-token
prompts and 64 new tokens each: 340 output tokens/s with 8 requests, 363 with 16, 538 with 32,
against 264 for 16 given to one `generate` call.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from mahir.generation import Token
from mahir.runtimes.continuous import BatchLoop, Request

Status = ov_genai.GenerationStatus
ENDED = (Status.FINISHED, Status.STOP, Status.CANCEL)
"""Statuses after which a request reads nothing more and holds no KV blocks (IGNORED, a request
the scheduler could not take, is a failure: `_read`)."""


@dataclass(eq=False)
class _Row:
    request: Request
    handle: Any
    """GenAI's `GenerationHandle` of the request."""


class OpenVinoBatch(BatchLoop[_Row]):
    """An engine thread running up to `slots` requests through `pipeline` (see the module's
    note); `config` makes each request's `GenerationConfig` from its `Sampling`."""

    def __init__(self, pipeline: Any, config: Any, *, slots: int) -> None:
        super().__init__(slots, "mahir-openvino-batch")
        self._pipeline, self._config = pipeline, config
        self._ids = itertools.count()
        self._start()

    def request_of(self, row: _Row) -> Request:
        return row.request

    def join(self, request: Request, index: int) -> _Row:
        ids = ov.Tensor(np.array([request.prompt], dtype=np.int64))
        handle = self._pipeline.add_request(next(self._ids), ids, self._config(request.sampling))
        return _Row(request, handle)

    def release(self, index: int) -> None:
        row = self.rows[index]
        if row is not None and row.handle.get_status() not in ENDED:
            row.handle.drop()  # the consumer left: its KV blocks go back to the scheduler

    def step(self) -> None:
        used = self.used()
        try:
            self._pipeline.step()
        except Exception as err:  # GenAI's: every running stream raises it
            self.fail(used, err)
            return
        self.settle(used, lambda _index, row: self._read(row))

    def _read(self, row: _Row) -> bool:
        """Hand the row its ready tokens; whether its sequence has ended."""
        if row.handle.can_read():
            scored = row.request.sampling.logprobs is not None
            for output in row.handle.read().values():
                logprobs = output.generated_log_probs if scored else None
                for index, token in enumerate(output.generated_ids):
                    chosen = int(token) if logprobs is None else Token(token, logprobs[index], ())
                    if row.request.deliver(chosen):
                        return True
        status = row.handle.get_status()
        if status in ENDED:
            row.request.tokens.put(None)
            return True
        if status != Status.RUNNING:
            row.request.tokens.put(RuntimeError(f"OpenVINO GenAI ended the request: {status}"))
            return True
        return False
