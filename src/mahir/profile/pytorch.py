"""torch.profiler around a torch session's calls: each op the model calls, timed, and costed from
the shapes the profiler recorded.

Each profiled call runs inside a `record_function` marker; the ops directly under it are the
ops the model called (`aten::linear`, `aten::layer_norm`, `aten::scaled_dot_product_attention`),
each timed with everything it called inside (CPU time; on a GPU the time of the CUDA kernels it
launched), so their sum is the call's op time without counting anything twice. Their costs
come from the input shapes, dtypes and scalar arguments the profiler recorded (`torch_ops.py`).
On a GPU the breakdown adds the kernels, their count, and the host time spent launching them: a
call whose kernels sum far below its latency is the host's (launch-bound), and the GPU idles
meanwhile. The profile exports as a Chrome trace.

Sits in profile/: imports torch, torch_ops and breakdown; runs any `Session` of the torch
runtime.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.profiler import DeviceType, ProfilerActivity, profile, record_function

from mahir.profile.breakdown import (
    WARMUP_RUNS,
    Breakdown,
    GpuTime,
    OpTime,
    median_times,
    paired,
    time_latency,
    timed,
)
from mahir.profile.cost import OpCost
from mahir.profile.torch_ops import aten_cost
from mahir.silence import native_stderr_kept
from mahir.types import Inputs, Session

MARK = "mahir run "
PRECISION_DTYPES = {
    "fp32": "float",
    "f32": "float",
    "fp16": "c10::Half",
    "f16": "c10::Half",
    "bf16": "c10::BFloat16",
}
"""A torch session's precision (as the encoder and LLM sessions spell it) as the profiler
names its dtype."""
CPU_EVENT = DeviceType.CPU
LAUNCHES = {"cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch"}


def profile_torch(session: Session, batch: Inputs, *, runs: int, seconds: float) -> Breakdown:
    """Profile `runs` calls of a torch `session` on `batch` (after `WARMUP_RUNS` unprofiled),
    then time the same call without the profiler."""
    cuda = session.device.kind == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    for _ in range(WARMUP_RUNS):
        session.run(batch)
    calls = []
    # One profiling cycle: acc_events changes nothing here but stops torch 2.11 from warning
    # that events of earlier cycles are cleared (a warning pytest raises).
    tracing = profile(activities=activities, record_shapes=True, acc_events=True)
    with native_stderr_kept(), tracing as profiler:
        for i in range(runs):
            with record_function(f"{MARK}{i}"):
                calls.append(timed(session, batch))
    latency = time_latency(session, batch, seconds)
    marks = sorted(
        (e for e in profiler.events() if e.name.startswith(MARK) and e.device_type == CPU_EVENT),
        key=_start,
    )  # on a GPU each marker also shows as an annotation on the GPU's timeline: not a call
    called = [sorted(mark.cpu_children, key=_start) for mark in marks]
    per_call = [_times(ops, cuda) for ops in called]
    times = median_times(per_call)
    assumed = PRECISION_DTYPES.get(str(session.describe().get("precision")), "float")
    ops = tuple(
        OpTime(name, event.name, times[name], _cost(name, event, assumed), str(session.device))
        for name, event in _named(called[-1])
    )
    return Breakdown(
        ops,
        latency,
        paired(per_call, calls),
        session.describe(),
        trace=_trace(profiler),
        gpu=_gpu(marks) if cuda else None,
    )


def _named(ops: Sequence[Any]) -> Iterator[tuple[str, Any]]:
    """Each op with a name that is the same in every call: its type and its place."""
    for index, event in enumerate(ops):
        yield f"{event.name.removeprefix('aten::')} #{index}", event


def _times(ops: Sequence[Any], cuda: bool) -> dict[str, float]:
    """Seconds of each op of one call: its CUDA kernels' on a GPU, else its CPU time."""
    return {
        name: (event.device_time_total if cuda else event.cpu_time_total) / 1e6
        for name, event in _named(ops)
    }


def _gpu(marks: Sequence[Any]) -> GpuTime:
    """The median call's kernel time, kernel count and launch time."""
    per_call = []
    for mark in marks:
        events = list(_subtree(mark))
        kernel = sum(k.duration for e in events for k in e.kernels) / 1e6
        count = sum(len(e.kernels) for e in events)
        launch = sum(e.cpu_time_total for e in events if e.name in LAUNCHES) / 1e6
        per_call.append((kernel, count, launch))
    kernel, count, launch = (statistics.median(values) for values in zip(*per_call, strict=True))
    return GpuTime(kernel, int(count), launch)


def _subtree(event: Any) -> Iterator[Any]:
    yield event
    for child in event.cpu_children:
        yield from _subtree(child)


def _cost(name: str, event: Any, assumed: str) -> OpCost | None:
    """The op's cost from its recorded shapes and dtypes. torch before 2.13 records no dtypes
    (`FunctionEvent.input_dtypes` is newer; the H200's torch 2.11 lacks it): then each input is
    taken to be in the session's precision (`assumed`, a profiler dtype name)."""
    dtypes = getattr(event, "input_dtypes", None) or [assumed] * len(event.input_shapes)
    return aten_cost(name, event.name, event.input_shapes, dtypes, event.concrete_inputs)


def _start(event: Any) -> float:
    return float(event.time_range.start)


def _trace(profiler: profile) -> list[dict[str, Any]]:
    """The profile's Chrome trace events (torch writes them only to a file)."""
    with tempfile.TemporaryDirectory(prefix="mahir-trace-") as folder:
        path = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(path))
        events: list[dict[str, Any]] = json.loads(path.read_text()).get("traceEvents", [])
    return events
