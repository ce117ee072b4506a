"""The roofline: each op, and the whole model, against what the device can do.

Williams, Waterman and Patterson, "Roofline: an insightful visual performance model for
multicore architectures", CACM 52(4), 2009. An op doing F FLOPs on B bytes takes at least

    t_compute = F / P        P: the device's peak FLOP/s in the op's precision (`peaks.py`)
    t_memory  = B / W        W: its memory bandwidth (STREAM triad, `peaks.py`)

so its time t >= max(t_compute, t_memory). Which roof binds is its arithmetic intensity F / B
against the ridge point P / W: above it compute-bound, below it memory-bound. An op whose time
is far above both (the roofline explains less than `OVERHEAD_FRACTION` of it) is neither: its
time goes to dispatch, thread hand-offs, kernel launches, layout changes: overhead-bound. An
op's fractions: achieved FLOP/s over P (t_compute / t), bytes/s over W (t_memory / t), and of
the roofline, max(t_compute, t_memory) / t. The whole model: FLOPs and bytes summed over its
costed ops, its roofline time the sum of theirs (each at its own roof), over the latency.

Bytes count every operand as moved to or from memory once, so an op whose operands stay in
cache can pass the memory roof (a bandwidth fraction above 1): then the roof is DRAM's and the
op is faster than it, which is good news, said as such. Peaks are measured here, not read
from a datasheet (`paper_peaks.py` gives those beside them).

Sits in profile/: imports peaks, cost and breakdown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mahir.peaks import FLOATS, Peaks
from mahir.profile.breakdown import OpTime

Bound = Literal["compute", "memory", "overhead", "unknown"]
OVERHEAD_FRACTION = 0.25
"""Below this share of its time explained by either roof, an op is overhead-bound: more than
4x slower than its size allows."""
BETTER_ROOF = 1.3
"""A lower precision's peak this many times the op's own is worth naming as a way up."""
PADDING_WORTH_NAMING = 0.1
TINY_KERNEL_S = 20e-6
"""A GPU op whose kernels take less than this is mostly the launch around them."""


@dataclass(frozen=True, slots=True)
class Roofline:
    """Where one op, or the whole model, sits against the roofs."""

    seconds: float
    flops: float
    bytes: float
    compute_s: float | None
    """FLOPs over the peak of its precision; None: no peak measured, or not costed."""
    memory_s: float | None
    """Bytes over the bandwidth; None: no bandwidth measured, or not costed."""
    roof_s: float | None
    """The least time the roofs allow: max of the two (the whole model: the sum over ops)."""
    peak: str | None = None
    """The dtype whose peak is the compute roof."""

    @property
    def bound(self) -> Bound:
        if self.roof_s is None or self.seconds <= 0:
            return "unknown"
        if self.roof_s < OVERHEAD_FRACTION * self.seconds:
            return "overhead"
        return "compute" if (self.compute_s or 0.0) >= (self.memory_s or 0.0) else "memory"

    @property
    def fraction(self) -> float | None:
        """Of the roofline: the least time the roofs allow over the time taken."""
        return self._share(self.roof_s)

    @property
    def flops_fraction(self) -> float | None:
        return self._share(self.compute_s)

    @property
    def bytes_fraction(self) -> float | None:
        return self._share(self.memory_s)

    def _share(self, roof_s: float | None) -> float | None:
        """A roof's time over the time taken; None where either is unknown (an op that ran
        no kernel on a GPU took no time there)."""
        return None if roof_s is None or self.seconds <= 0 else roof_s / self.seconds

    @property
    def intensity(self) -> float | None:
        """FLOPs per byte moved."""
        return self.flops / self.bytes if self.bytes > 0 else None


def place(op: OpTime, peaks: Peaks) -> Roofline:
    """`op` against the roofs of `peaks`, at the peak of the precision it ran in."""
    if op.cost is None:
        return Roofline(op.seconds, 0.0, 0.0, None, None, None)
    peak, _ = peaks.denominator(op.computes_in)
    compute = None if peak is None else op.cost.flops / peak.flops_per_s
    memory = None if peaks.bandwidth is None else op.cost.bytes / peaks.bandwidth.bytes_per_s
    known = [t for t in (compute, memory) if t is not None]
    roof = max(known) if known else None
    dtype = None if peak is None else peak.dtype
    return Roofline(op.seconds, op.cost.flops, op.cost.bytes, compute, memory, roof, dtype)


def whole(ops: Sequence[OpTime], latency_s: float, peaks: Peaks) -> Roofline:
    """The whole model: its costed ops summed, against the latency of a call."""
    placed = [place(op, peaks) for op in ops if op.cost is not None]
    heavy = max(placed, key=lambda r: r.flops, default=None)

    def total(values: list[float | None]) -> float | None:
        return None if not values or None in values else sum(v for v in values if v is not None)

    return Roofline(
        latency_s,
        sum(r.flops for r in placed),
        sum(r.bytes for r in placed),
        total([r.compute_s for r in placed]),
        total([r.memory_s for r in placed]),
        total([r.roof_s for r in placed]),
        heavy.peak if heavy else None,
    )


def ridge(peaks: Peaks, precision: str) -> float | None:
    """FLOPs per byte where the compute roof meets the memory roof, in `precision`."""
    peak, _ = peaks.denominator(precision)
    if peak is None or peaks.bandwidth is None:
        return None
    return peak.flops_per_s / peaks.bandwidth.bytes_per_s


def advice(op: OpTime, roof: Roofline, peaks: Peaks, *, gpu: bool, padding: float = 0.0) -> str:
    """One sentence on what would make `op` faster, from its bound and its kind."""
    kind = op.cost.kind if op.cost is not None else "other"
    bound = roof.bound
    if bound == "unknown":
        return "Not on the roofline: its cost or the device's peaks are not known here."
    if bound == "overhead":
        return _overhead(op, kind, gpu)
    padded = ""
    if kind in ("matmul", "attention", "conv") and padding >= PADDING_WORTH_NAMING:
        padded = (
            f"; {padding:.0%} of the tokens are padding, which padding removal (length-sorted "
            "batches, packing) skips"
        )
    if bound == "memory":
        return _memory(kind) + padded + "."
    return _compute(op.computes_in, peaks, gpu) + padded + "."


def _overhead(op: OpTime, kind: str, gpu: bool) -> str:
    """On a GPU an op's time is its kernels' time, so what the roofs leave unexplained is a
    kernel that is tiny (its launch costs more than its work) or ill-suited, not dispatch."""
    if gpu and op.seconds < TINY_KERNEL_S:
        return (
            "Tiny kernels: each costs a launch the GPU waits for; CUDA graphs (torch-compile on "
            "a GPU) launch the whole forward at once, and larger batches give each launch more "
            "work."
        )
    if gpu and kind == "attention":
        return (
            "Its kernels run far below both roofs: a padding mask keeps PyTorch's attention off "
            "its flash kernel; packed sequences (varlen flash attention, mahir's packed "
            "candidates) need no mask."
        )
    if gpu:
        return (
            "Its kernels run far below both roofs (too little work to fill the GPU, or a kernel "
            "ill-suited to this shape): larger batches, or fusion (torch.compile), help."
        )
    if kind in ("matmul", "conv", "attention"):
        return (
            "Far above both roofs: neither the math nor the memory explains its time (thread "
            "hand-offs, dispatch, a kernel ill-suited to this shape, a core taken by another "
            "process); more rows per call amortise what is fixed."
        )
    return (
        "Overhead-bound small op: fusion into its neighbour removes the call (ONNX Runtime and "
        "OpenVINO fuse more of the graph than eager torch; torch.compile fuses it in torch)."
    )


def _memory(kind: str) -> str:
    if kind in ("matmul", "conv"):
        return (
            "Memory-bound: it streams its weights for few rows; batching reuses each weight "
            "read across more rows, and int8 (bf16) weights move a quarter (half) the bytes"
        )
    if kind == "attention":
        return "Memory-bound attention: a fused attention kernel keeps the scores out of memory"
    return (
        "Memory-bound elementwise work: fusion into the neighbouring matmul saves writing and "
        "re-reading its tensor"
    )


def _compute(precision: str, peaks: Peaks, gpu: bool) -> str:
    """The advice names the faster roofs mahir optimize tries on this kind of device: int8 on
    a CPU, fp8 on a GPU, and 16-bit floats for fp32 work on either."""
    own = peaks.get(precision)
    lower = "fp8" if gpu else "int8"
    faster = [
        p
        for p in peaks.peaks
        if own is not None
        and p.dtype != precision
        and (p.dtype == lower or (p.dtype in FLOATS and precision == "fp32"))
        and p.flops_per_s > BETTER_ROOF * own.flops_per_s
    ]
    if own is None or not faster:
        return (
            f"Compute-bound at the {precision} roof: only less work helps (fewer tokens, a "
            "smaller or pruned model)"
        )
    best = max(faster, key=lambda p: p.flops_per_s)
    return (
        f"Compute-bound in {precision}: {best.dtype} matmuls raise the roof "
        f"{best.flops_per_s / own.flops_per_s:.1f}x on this device (mahir optimize tries them "
        "within the quality budget)"
    )
