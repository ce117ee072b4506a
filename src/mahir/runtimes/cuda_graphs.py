"""CUDA graphs, one per input shape, replayed from static buffers.

A batch-1 forward of a small encoder launches hundreds of kernels; eager, the GPU idles between
them (MiniLM at 1x128 on an H200: 2.8 ms eager, the kernels themselves a fraction of that). A
CUDA graph launches them all at once. torch.compile's mode="reduce-overhead" does this too, but
pays on every call for its guards and graph-tree bookkeeping; here each shape's graph is
captured once from the compiled module and each call is: write the inputs into one pinned
host buffer, copy it to the GPU buffer that holds the graph's static inputs (one copy however
many inputs: a packed batch has five, and each driver call costs the host time and, where
another thread holds the GIL, a wait to get it back), replay, copy the outputs back through
pinned buffers, synchronise. Captures share one memory pool: graphs run one at a time and
every output is copied out before the next replay, so the pool's blocks may be reused across
graphs.

`Buckets` (buckets.py) in front keeps the number of shapes, and so of graphs, small. Captured
code must not synchronise with the host; a module that does fails its capture, which is
reported in one line naming the eager runtime instead.
"""

from __future__ import annotations

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
    staging: torch.Tensor
    """Its pinned host twin, which the inputs are written into first."""
    views: dict[str, np.ndarray]
    """Each input's place in `staging`, as numpy writes it."""
    outputs: tuple[torch.Tensor, ...]
    """The graph's static outputs on the GPU."""
    host: tuple[torch.Tensor, ...]
    """Pinned host buffers the outputs are copied into."""


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


class CudaGraphs:
    """Replays `module` (a callable taking the spec's inputs by keyword and returning a tuple)
    as one captured CUDA graph per input shape."""

    def __init__(self, module: Any, output_names: tuple[str, ...], device: Device) -> None:
        self._module, self._names, self._device = module, output_names, str(device)
        self._graphs: dict[Key, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream(self._device)  # type: ignore[no-untyped-call, unused-ignore]

    @property
    def shapes(self) -> int:
        """Graphs captured so far."""
        return len(self._graphs)

    def run(self, inputs: Inputs) -> Outputs:
        key: Key = tuple((n, a.shape, a.dtype.str) for n, a in inputs.items())
        graph = self._graphs.get(key) or self._capture(key, inputs)
        for name, array in inputs.items():  # numpy into pinned memory: no driver call
            np.copyto(graph.views[name], array, casting="no")
        with torch.cuda.stream(self._stream):
            graph.device.copy_(graph.staging, non_blocking=True)  # one copy for all inputs
            graph.graph.replay()
            for buffer, output in zip(graph.host, graph.outputs, strict=True):
                buffer.copy_(output, non_blocking=True)
            self._stream.synchronize()
        # copied: the pinned buffers are the next call's too
        return {name: b.numpy().copy() for name, b in zip(self._names, graph.host, strict=True)}

    def _capture(self, key: Key, inputs: Inputs) -> _Graph:
        offsets, size = byte_layout(inputs)
        device = torch.empty(size, dtype=torch.uint8, device=self._device)
        staging = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        static = place(device, offsets, inputs)
        views = {name: view.numpy() for name, view in place(staging, offsets, inputs).items()}
        for name, array in inputs.items():
            np.copyto(views[name], array, casting="no")
        device.copy_(staging)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(WARMUP_RUNS):  # compile errors surface here, as on any first call
                self._module(**static)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    outputs = self._module(**static)
            except RuntimeError as err:  # a host synchronisation inside the model, most often
                raise RuntimeFailure(
                    f"cannot capture this model as a CUDA graph: {first_line(err)}; use 'torch'"
                ) from err
        check_returned(outputs, self._names)
        captured = _Graph(
            graph,
            device,
            staging,
            views,
            outputs,
            tuple(torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in outputs),
        )
        self._graphs[key] = captured
        return captured
