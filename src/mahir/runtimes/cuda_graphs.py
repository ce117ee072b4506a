"""CUDA graphs, one per input shape, replayed from static buffers.

A batch-1 forward of a small encoder launches hundreds of kernels; eager, the GPU idles between
them (MiniLM at 1x128 on an H200: 2.8 ms eager, the kernels themselves a fraction of that). A
CUDA graph launches them all at once. torch.compile's mode="reduce-overhead" does this too, but
pays on every call for its guards and graph-tree bookkeeping; here each shape's graph is
captured once from the compiled module and each call is: copy the inputs into pinned host
buffers and on to the graph's static inputs, replay, copy the outputs back through pinned
buffers, synchronise. Captures share one memory pool: graphs run one at a time and every
output is copied out before the next replay, so the pool's blocks may be reused across graphs.

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


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    """The graph's static inputs on the GPU."""
    staging: dict[str, torch.Tensor]
    """Pinned host buffers the inputs are written into first."""
    outputs: tuple[torch.Tensor, ...]
    """The graph's static outputs on the GPU."""
    host: tuple[torch.Tensor, ...]
    """Pinned host buffers the outputs are copied into."""


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
        with torch.cuda.stream(self._stream):
            for name, array in inputs.items():
                np.copyto(graph.staging[name].numpy(), array, casting="no")
                graph.inputs[name].copy_(graph.staging[name], non_blocking=True)
            graph.graph.replay()
            for buffer, output in zip(graph.host, graph.outputs, strict=True):
                buffer.copy_(output, non_blocking=True)
            self._stream.synchronize()
        # copied: the pinned buffers are the next call's too
        return {name: b.numpy().copy() for name, b in zip(self._names, graph.host, strict=True)}

    def _capture(self, key: Key, inputs: Inputs) -> _Graph:
        static = {
            n: torch.from_numpy(np.ascontiguousarray(a)).to(self._device) for n, a in inputs.items()
        }
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
            static,
            {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for n, t in static.items()},
            outputs,
            tuple(torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in outputs),
        )
        self._graphs[key] = captured
        return captured
