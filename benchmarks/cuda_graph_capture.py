"""How a sentence encoder's forward is best replayed as a CUDA graph on a GPU: captured once per
shape from static buffers (what mahir's `runtimes/cuda_graphs.py` does), from the eager module
and from the torch.compile'd one, against torch.compile(mode="reduce-overhead") with the stock
calling code, in the same run, interleaved.

The model: all-MiniLM-L6-v2's shape with random weights, fp16, mean-pooled and normalized inside
(`PooledEmbedding`), so every variant returns only the sentence embedding. Reported: p50 per call
over 200 interleaved calls at batch 1 (16 and 128 tokens) and 20 at 256x128, and the largest
difference from the reduce-overhead answer.

Usage: PYTHONPATH=src python benchmarks/cuda_graph_capture.py
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import transformers

from mahir.modules import LowPrecision, PooledEmbedding, TupleOutputs

Batch = dict[str, np.ndarray]


def batch(rows: int, tokens: int) -> Batch:
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(1000, 30000, (rows, tokens)).astype(np.int64),
        "attention_mask": np.ones((rows, tokens), np.int64),
    }


class Captured:
    """One CUDA graph per shape, replayed from static inputs fed through pinned buffers."""

    def __init__(self, module: Any) -> None:
        self.module, self.graphs = module, {}  # type: ignore[var-annotated]

    def __call__(self, inputs: Batch) -> np.ndarray:
        key = tuple((k, v.shape) for k, v in inputs.items())
        if key not in self.graphs:
            static = {k: torch.from_numpy(v).cuda() for k, v in inputs.items()}
            pinned = {
                k: torch.empty(v.shape, dtype=torch.int64, pin_memory=True)
                for k, v in inputs.items()
            }
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(3):
                    self.module(**static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                out = self.module(**static)[0]
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            self.graphs[key] = (static, pinned, graph, out, host)
        static, pinned, graph, out, host = self.graphs[key]
        for name, array in inputs.items():
            np.copyto(pinned[name].numpy(), array)
            static[name].copy_(pinned[name], non_blocking=True)
        graph.replay()
        host.copy_(out, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return host.numpy().copy()


def stock(module: Any) -> Callable[[Batch], np.ndarray]:
    def run(inputs: Batch) -> np.ndarray:
        tensors = {k: torch.from_numpy(v).cuda(non_blocking=True) for k, v in inputs.items()}
        with torch.inference_mode():
            return module(**tensors)[0].cpu().numpy()  # type: ignore[no-any-return]

    return run


def main() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    bert = TupleOutputs(transformers.BertModel(config).eval(), ("last_hidden_state",))
    module = PooledEmbedding(LowPrecision(bert, torch.float16), "mean", True).eval().cuda()
    reduce_overhead = stock(torch.compile(copy.deepcopy(module), mode="reduce-overhead"))
    variants = {
        "eager-graph": Captured(module),
        "compiled-graph": Captured(torch.compile(module, dynamic=True)),
    }
    for name, captured in variants.items():
        for rows, tokens, calls in ((1, 16, 200), (1, 128, 200), (256, 128, 20)):
            inputs = batch(rows, tokens)
            for _ in range(5):
                captured(inputs)
                reduce_overhead(inputs)
            mine, theirs = [], []
            for _ in range(calls):
                start = time.perf_counter()
                captured(inputs)
                mine.append(time.perf_counter() - start)
                start = time.perf_counter()
                reduce_overhead(inputs)
                theirs.append(time.perf_counter() - start)
            diff = float(np.abs(captured(inputs) - reduce_overhead(inputs)).max())
            print(
                f"{name} {rows}x{tokens}: captured {1e3 * np.median(mine):.3f} ms, "
                f"reduce-overhead {1e3 * np.median(theirs):.3f} ms, max diff {diff:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
