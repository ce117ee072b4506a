"""What `mahir optimize` searches for: the objective, the batch sizes, the quality and time
budgets, the inputs and the device. Checked whole when made, before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mahir.errors import BadInput
from mahir.families import refuse_text_options
from mahir.model import Model
from mahir.search.budget import FidelityBudget
from mahir.search.candidates import Objective
from mahir.types import CPU, Device

THROUGHPUT_SIZES = {"cpu": (8, 32), "cuda": (64, 256)}
"""Batch sizes timed for throughput when none are given: a GPU idles at a CPU's batches."""

# Share of the time budget kept for timing when candidates are built: building stops when less
# than this is left, so the survivors are still measured properly.
TIMING_SHARE = 0.35


@dataclass(frozen=True, slots=True)
class OptimizeConfig:
    """What `optimize` searches for, on which inputs, within what quality and time."""

    objective: Objective = "latency"
    """latency: batch-1 p50 (the smallest batch size); throughput: best samples/s."""
    batch_sizes: tuple[int, ...] = ()
    """Batch sizes timed; default (1,) for latency, (8, 32) for throughput."""
    max_drop: float = 0.01
    """Quality budget: fidelity drop (see budget.py), or the user metric's absolute drop."""
    time_budget_s: float | None = None
    """Wall time for the whole search; None: try every candidate."""
    only: tuple[str, ...] = ()
    """Candidate ids to try (the baseline always runs); empty: all proposed."""
    sentences: tuple[str, ...] = ()
    """The user's sentences for the workload; generated text when empty."""
    token_range: tuple[int, int] | None = None
    batches_per_size: int = 8
    metric: str | None = None
    """`module:fn` or `file.py:fn` scoring (outputs, data) -> float, higher is better."""
    data: Path | None = None
    """The data the metric scores (see `Family.read_user_data`)."""
    seed: int = 0
    device: Device = CPU
    """Where the candidates run: the CPU's candidates, or a CUDA GPU's (search/cuda.py)."""
    roofline: bool = True
    """Profile the baseline and the winner for the report's roofline (`rooflines.py`: a second
    or two for a small model); False: the report goes without it."""

    def __post_init__(self) -> None:
        if self.objective not in ("latency", "throughput"):
            raise BadInput(f"objective must be latency or throughput, got {self.objective!r}")
        if (self.metric is None) != (self.data is None):
            raise BadInput("--metric and --data go together: the metric scores that data")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise BadInput(f"--time-budget must be > 0 minutes, got {self.time_budget_s / 60:g}")
        if any(size < 1 for size in self.batch_sizes):
            raise BadInput(f"batch sizes must be >= 1, got {list(self.batch_sizes)}")
        if self.metric is None:
            FidelityBudget(self.max_drop)  # refuses a drop outside [0, 0.5), as the search would
        elif not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise BadInput(f"--max-drop must be a number >= 0 for a metric, got {self.max_drop}")
        if self.data is not None and not self.data.is_file():
            raise BadInput(f"{self.data} does not exist: give the data file the metric scores")

    def check_model(self, model: Model) -> None:
        """Refuse what `model` cannot use instead of ignoring it: sentences and token counts
        shape text, which only text models read."""
        given = {"--sentences": bool(self.sentences), "--tokens": self.token_range is not None}
        refuse_text_options(model.family, model.name, given)

    @property
    def sizes(self) -> tuple[int, ...]:
        if self.batch_sizes:
            return tuple(sorted(set(self.batch_sizes)))
        return (1,) if self.objective == "latency" else THROUGHPUT_SIZES[self.device.kind]
