"""What one forward of the original model costs, in FLOPs, at the shapes a run times.

Counted by torch's `FlopCounterMode` on the torch module: matmuls, convolutions and attention,
2 FLOPs per multiply-add (a Linear of K inputs and N outputs on M rows: 2*M*N*K); elementwise
work is not counted, as MFU conventionally does not (nanoGPT's `estimate_mfu`). The module
runs on fake tensors (shapes, no data, no arithmetic), so a batch of 256x128 costs no more to
count than one of 1x8. A forward that reads its data (a `.item()`, data-dependent control flow,
which fake tensors cannot follow) is counted on one real row and multiplied by the rows: every
op of an inference forward works on each row alone. An ONNX source has no torch module here:
its cost is "not counted", never guessed.

Core layer: imports the model and torch; `profile/` may break the count down by op.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from mahir.errors import first_line
from mahir.model import Model
from mahir.workload import Batch

FAKE = "torch FlopCounterMode on fake tensors"
ONE_ROW = "torch FlopCounterMode on one real row, times the rows"


@dataclass(frozen=True, slots=True)
class Cost:
    """FLOPs of one forward per batch size, or why they were not counted."""

    flops_per_batch: dict[int, float] = field(default_factory=dict)
    """The mean over the size's timing batches (text batches differ in padded length)."""
    method: str | None = None
    note: str | None = None
    """Why nothing was counted: an ONNX source, a forward that failed."""


def count_flops(module: Any, inputs: Mapping[str, torch.Tensor]) -> int:
    """FLOPs of `module(**inputs)` as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(**inputs)
    return int(counter.get_total_flops())


def forward_flops(module: Any, batch: Batch) -> tuple[int, str]:
    """FLOPs of one forward on `batch`, and how they were counted (`FAKE` or `ONE_ROW`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tensors = {name: torch.from_numpy(np.array(array)) for name, array in batch.items()}
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            return count_flops(module, {n: mode.from_tensor(t) for n, t in tensors.items()}), FAKE
    except Exception:  # a forward that reads its data raises any error under fake tensors
        rows = len(next(iter(tensors.values())))
        return count_flops(module, {n: t[:1] for n, t in tensors.items()}) * rows, ONE_ROW


def model_cost(model: Model, batches: Mapping[int, Sequence[Batch]]) -> Cost:
    """FLOPs per batch at each batch size of `batches` (the run's timing workload), each
    distinct shape counted once."""
    if model.module is None:
        return Cost(note="not counted: an ONNX source has no torch module to count FLOPs on")
    counted: dict[tuple[tuple[str, tuple[int, ...]], ...], tuple[int, str]] = {}
    per_batch: dict[int, float] = {}
    try:
        for size, size_batches in batches.items():
            flops = []
            for batch in size_batches:
                shape = tuple(sorted((n, a.shape) for n, a in batch.items()))
                if shape not in counted:
                    counted[shape] = forward_flops(model.module, batch)
                flops.append(counted[shape][0])
            per_batch[size] = sum(flops) / len(flops)
    except Exception as err:  # the user's forward: whatever it raises, the run goes on
        return Cost(note=f"not counted: the forward failed ({first_line(err)})")
    methods = sorted({how for _, how in counted.values()})
    return Cost(per_batch, method=" and ".join(methods) or None)


if __name__ == "__main__":
    from mahir.model import load_model

    minilm = load_model()
    cost = model_cost(minilm, minilm.family.workload([1, 32], batches_per_size=2).batches)
    for size, flops in cost.flops_per_batch.items():
        print(f"{minilm.name}, batch {size}: {flops / 1e9:,.2f} GFLOP per forward ({cost.method})")
