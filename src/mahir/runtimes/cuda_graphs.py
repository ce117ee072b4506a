"""CUDA graphs, one per input shape, replayed from static buffers.

A batch-1 forward of a small encoder launches hundreds of kernels; eager, the GPU idles between
them (MiniLM at 1x128 on an H200: 2.8 ms eager, the kernels themselves a fraction of that). A
CUDA graph launches them all at once. torch.compile's mode="reduce-overhead" does this too, but
pays on every call for its guards and graph-tree bookkeeping; here each shape's graph is
captured once from the compiled module and each call is: write the inputs into one pinned
host buffer, copy it to the GPU buffer that holds the graph's static inputs (one copy however
many inputs: a packed batch has five, and each driver call costs the host time and, where
another thread holds the GIL, a wait to get it back), replay, copy the outputs back into pinned
buffers. `submit` queues all that and returns; `result()` waits for it. So a caller that
submits the next batch before it waits for this one (`mahir.embed`) keeps the GPU busy while
the host tokenizes. Everything runs on one stream, in order: captures share one memory pool,
and a graph's outputs are copied out before any later replay may reuse the pool's blocks.
Several threads may submit (a server's workers): each batch's copy in, replay and copy out are
queued under one lock, so no other batch's inputs land in the static buffers between them, and
each thread stages its inputs and waits for its outputs outside it.

`Buckets` (buckets.py) in front keeps the number of shapes, and so of graphs, small. Captured
code must not synchronise with the host; a module that does fails its capture, which is
reported in one line naming the eager runtime instead.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mahir.errors import BadInput, RuntimeFailure, first_line
from mahir.types import Device, Inputs, Outputs


def check_returned(results: Any, names: tuple[str, ...]) -> None:
    """Refuse, in one line, a module that does not return one tensor per output name."""
    if not isinstance(results, tuple) or len(results) != len(names):
        raise BadInput(
            f"the module returned {type(results).__name__}, not a tuple of {len(names)} "
            f"tensors {names}; wrap it in mahir.modules.TupleOutputs"
        )


WARMUP_RUNS = 3
"""Runs before a capture, on a side stream: compilation, autotuning and lazy allocations done."""

Key = tuple[tuple[str, tuple[int, ...], str], ...]


ALIGN = 64
"""Bytes each input's place in the staging buffers is aligned to."""


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    device: torch.Tensor
    """One GPU buffer (bytes) holding every static input the graph reads."""
    offsets: dict[str, int]
    """Where each input starts in it (`byte_layout`)."""
    outputs: tuple[torch.Tensor, ...]
    """The graph's static outputs on the GPU."""


def byte_layout(inputs: Inputs) -> tuple[dict[str, int], int]:
    """Where each input starts in one buffer of all of them (aligned), and the buffer's size."""
    offsets, size = {}, 0
    for name, array in inputs.items():
        offsets[name] = size
        size += -(-array.nbytes // ALIGN) * ALIGN
    return offsets, max(size, ALIGN)


def place(buffer: torch.Tensor, offsets: dict[str, int], inputs: Inputs) -> dict[str, torch.Tensor]:
    """Each input's view into `buffer` (uint8, laid out by `byte_layout`), shaped as it."""
    views = {}
    for name, array in inputs.items():
        start = offsets[name]
        raw = buffer[start : start + array.nbytes]
        dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype
        views[name] = raw.view(dtype).view(array.shape)
    return views


def _staged(size: int, offsets: dict[str, int], inputs: Inputs) -> torch.Tensor:
    """A pinned host buffer of `size` bytes holding the inputs, laid out by `byte_layout`."""
    staging = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    for name, view in place(staging, offsets, inputs).items():
        np.copyto(view.numpy(), inputs[name], casting="no")  # numpy: no driver call
    return staging


class CudaGraphs:
    """Replays `module` (a callable taking the spec's inputs by keyword and returning a tuple)
    as one captured CUDA graph per input shape."""

    def __init__(self, module: Any, output_names: tuple[str, ...], device: Device) -> None:
        self._module, self._names, self._device = module, output_names, str(device)
        self._graphs: dict[Key, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream(self._device)  # type: ignore[no-untyped-call, unused-ignore]
        self._queueing = threading.Lock()

    @property
    def shapes(self) -> int:
        """Graphs captured so far."""
        return len(self._graphs)

    def run(self, inputs: Inputs) -> Outputs:
        return self.submit(inputs).result()

    def submit(self, inputs: Inputs) -> _Queued:
        """Queue the batch's copy in, replay and copy out on the graphs' stream; return at once."""
        key: Key = tuple((n, a.shape, a.dtype.str) for n, a in inputs.items())
        graph = self._graphs.get(key) or self._captured(key, inputs)
        # Fresh pinned buffers from torch's caching host allocator: a block is handed out again
        # only once the copies queued on it are done, so the host may write the next batch
        # while this one is in flight, and this batch's outputs stay its own until read.
        staging = _staged(graph.device.shape[0], graph.offsets, inputs)
        host = tuple(torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in graph.outputs)
        done = torch.cuda.Event()  # type: ignore[no-untyped-call, unused-ignore]
        with self._queueing, torch.cuda.stream(self._stream):
            graph.device.copy_(staging, non_blocking=True)  # one copy for all inputs
            graph.graph.replay()
            for buffer, output in zip(host, graph.outputs, strict=True):
                buffer.copy_(output, non_blocking=True)
            done.record(self._stream)
        return _Queued(self._names, host, done)

    def _captured(self, key: Key, inputs: Inputs) -> _Graph:
        """The graph for `key`, captured now unless another thread did while this one waited."""
        with self._queueing:
            return self._graphs.get(key) or self._capture(key, inputs)

    def _capture(self, key: Key, inputs: Inputs) -> _Graph:
        offsets, size = byte_layout(inputs)
        device = torch.empty(size, dtype=torch.uint8, device=self._device)
        static = place(device, offsets, inputs)
        device.copy_(_staged(size, offsets, inputs))
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(WARMUP_RUNS):  # compile errors surface here, as on any first call
                self._module(**static)
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: a worker waiting for its batch meanwhile does not void the capture
                with torch.cuda.graph(
                    graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"
                ):
                    outputs = self._module(**static)
            except RuntimeError as err:  # a host synchronisation inside the model, most often
                raise RuntimeFailure(
                    f"cannot capture this model as a CUDA graph: {first_line(err)}; use 'torch'"
                ) from err
        check_returned(outputs, self._names)
        captured = _Graph(graph, device, offsets, outputs)
        self._graphs[key] = captured
        return captured


@dataclass(frozen=True, slots=True)
class _Queued:
    """One batch queued by `CudaGraphs.submit`: its outputs land in `host` once `done`."""

    names: tuple[str, ...]
    host: tuple[torch.Tensor, ...]
    done: torch.cuda.Event

    def result(self) -> Outputs:
        self.done.synchronize()  # type: ignore[no-untyped-call, unused-ignore]
        # each array keeps its pinned buffer alive, and no later batch writes it
        return {name: b.numpy() for name, b in zip(self.names, self.host, strict=True)}
