"""`mahir bench`: the same model on several runtimes and batch sizes, measured in one run.

The order of work is what makes the numbers honest: one workload for everyone (saved as .npz);
every runtime's outputs compared with the fp32 original on every batch before any timing; then,
per batch size, all runtimes timed interleaved so machine drift hits them alike. Speedups are
ratios of medians against the baseline at the same batch size: the original as given, on the
runtime that gives its reference answers (PyTorch eager for a module, ONNX Runtime for an ONNX
file). By default every runtime that can run the source is measured.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from mahir.errors import BadInput
from mahir.export.conversions import reachable
from mahir.families import real_tokens, refuse_text_options
from mahir.hardware import Machine, detect
from mahir.measure import MeasureConfig, load_summary, measure, memory_added
from mahir.model import Model
from mahir.passes import PassContext
from mahir.quality import fidelity
from mahir.runtimes import RUNTIMES, get_runtime, open_session, reference_outputs, reference_runtime
from mahir.search.builder import ArtifactBuilder
from mahir.types import CPU, Device, Perf, Quality, RuntimeOptions, Session
from mahir.workload import Workload

DEFAULT_RUNTIMES = ("torch", "onnxruntime", "openvino")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What `benchmark` measures: which runtimes, at which batch sizes, on which inputs."""

    runtimes: tuple[str, ...] = ()
    """Runtime names from `mahir.runtimes.RUNTIMES`; empty: those of `DEFAULT_RUNTIMES` that
    can run the model's source."""
    batch_sizes: tuple[int, ...] = (1, 32)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    batches_per_size: int = 8
    """Distinct batches per batch size; timing cycles through them."""
    sentences: tuple[str, ...] = ()
    """The user's sentences; generated text when empty."""
    token_range: tuple[int, int] | None = None
    """Generated sentences' token counts, uniform in this range; short-skewed when None."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in self.runtimes:
            get_runtime(name)  # unknown names fail before any work
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {list(self.batch_sizes)}")


@dataclass(frozen=True, slots=True)
class BenchRow:
    """One runtime at one batch size: its timing, its fidelity, and what it ran with."""

    runtime: str
    batch_size: int
    perf: Perf
    quality: Quality
    settings: dict[str, Any]
    memory_mb: float
    """Resident memory the session added when opened and first run."""
    size_mb: float
    """Size of the artifact the runtime ran: files on disk, or torch parameters and buffers."""


@dataclass
class BenchResult:
    """Every row of one run, with the machine, model and workload that produced them."""

    machine: Machine
    model: Model
    workload: Workload
    rows: list[BenchRow]
    baseline: str
    """The runtime speedups are over (see `runnable_runtimes`)."""
    date: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())

    def speedup(self, row: BenchRow) -> float | None:
        """Baseline p50 over this row's p50, at the same batch size."""
        for base in self.rows:
            if base.runtime == self.baseline and base.batch_size == row.batch_size:
                return base.perf.p50_ms / row.perf.p50_ms
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "machine": self.machine.to_dict(),
            "model": model_summary(self.model),
            "workload": self.workload.describe(self.model.family.token_lengths),
            "baseline": self.baseline,
            "machine_load": load_summary(row.perf for row in self.rows),
            "results": [self._row_json(row) for row in self.rows],
        }

    def _row_json(self, row: BenchRow) -> dict[str, Any]:
        headline = row.quality.headline
        perf = row.perf
        return {
            "runtime": row.runtime,
            "device": perf.device,
            "batch_size": row.batch_size,
            "p50_ms": perf.p50_ms,
            "p90_ms": perf.p90_ms,
            "p99_ms": perf.p99_ms,
            "throughput": perf.throughput,
            "tokens_per_s": perf.tokens_per_s,
            "runs": len(perf.latencies_ms),
            "spread": perf.spread,
            "noisy": perf.noisy,
            "speedup": self.speedup(row),
            "memory_mb": row.memory_mb,
            "size_mb": row.size_mb,
            "settings": row.settings,
            "quality": {
                "cosine_mean": headline.cosine_mean,
                "cosine_min": headline.cosine_min,
                "max_abs_err": headline.max_abs_err,
                "measured_on": "sentence_embedding"
                if row.quality.embedding is not None
                else "outputs",
                "outputs": {
                    name: {
                        "cosine_mean": f.cosine_mean,
                        "cosine_min": f.cosine_min,
                        "max_abs_err": f.max_abs_err,
                        "max_rel_err": f.max_rel_err,
                        "top1_agreement": f.top1_agreement,
                    }
                    for name, f in row.quality.outputs.items()
                },
            },
        }

    def __rich__(self) -> Table:
        fidelity = self.model.family.fidelity_name
        caption = f"cosine: {fidelity} vs the fp32 original, mean / worst sample"
        if any(row.perf.noisy for row in self.rows):
            caption += "; ~ noisy: jitter over 10%, small differences are not real"
        note = load_summary(row.perf for row in self.rows)["note"]
        if note:
            caption += f"\n[bold red]{note}[/bold red]"
        table = Table(title=f"{self.model.name} on {self.machine.summary()}", caption=caption)
        # A classifier's answer is its top class: how often it agrees gets its own column.
        top1 = any(row.quality.headline.top1_agreement is not None for row in self.rows)
        columns = ("runtime", "batch", "p50 ms", "p99 ms", "samples/s", "speedup", "cosine")
        for column in (*columns, "top-1")[: len(columns) + top1]:
            table.add_column(column, justify="left" if column == "runtime" else "right")
        for row in self.rows:
            speedup = self.speedup(row)
            headline = row.quality.headline
            agreement = headline.top1_agreement
            table.add_row(
                row.runtime,
                str(row.batch_size),
                f"{_ms(row.perf.p50_ms)}{' ~' if row.perf.noisy else ''}",
                _ms(row.perf.p99_ms),
                f"{row.perf.throughput:,.0f}",
                "" if speedup is None else f"{speedup:.2f}x",
                f"{headline.cosine_mean:.5f} / {headline.cosine_min:.5f}",
                *([] if not top1 else ["" if agreement is None else f"{agreement:.1%}"]),
            )
        return table


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def model_summary(model: Model) -> dict[str, Any]:
    return {
        "name": model.name,
        "source": model.source,
        "inputs": [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in model.spec.inputs
        ],
        "outputs": list(model.spec.outputs),
        "family": model.family.kind,
        **model.family.summary(),
    }


def runnable_runtimes(
    model: Model, asked: tuple[str, ...], device: Device = CPU
) -> tuple[str, ...]:
    """The runtimes to measure: those asked for, each refused with the reason if no conversion
    leads from this model's source to what it opens, it does not run on `device`, or its package
    (or, on a GPU, its ONNX Runtime provider) is not installed; none asked: the defaults that
    can."""
    missing = {name: package for name, r in RUNTIMES.items() if (package := r.missing())}
    absent = [
        f"{name} needs {missing[name]} (pip install {missing[name]})"
        for name in asked
        if name in missing
    ]
    if absent:
        raise BadInput(f"not installed here: {'; '.join(absent)}")
    source = model.original().format
    convertible = [
        name for name, r in RUNTIMES.items() if reachable(source, r.formats) and name not in missing
    ]
    there = [name for name in convertible if device.kind in RUNTIMES[name].devices]
    lacking = {name: why for name in there if (why := RUNTIMES[name].unavailable(device))}
    able = [name for name in there if name not in lacking]
    unconvertible = sorted(set(asked) - set(convertible))
    if unconvertible:
        raise BadInput(
            f"{', '.join(unconvertible)} run PyTorch modules, and {model.name} is an ONNX "
            f"file: choose from {', '.join(able)}"
        )
    refused = sorted({lacking[name] for name in asked if name in lacking})
    if refused:
        raise BadInput("; ".join(refused))
    if not able:
        why = f" here ({'; '.join(sorted(set(lacking.values())))})" if lacking else " yet"
        raise BadInput(f"no runtime runs {model.name} on {device}{why}: use --device cpu")
    elsewhere = sorted(set(asked) - set(able))
    if elsewhere:
        raise BadInput(
            f"{', '.join(elsewhere)} cannot run on {device}: choose from {', '.join(able)}"
        )
    return asked or tuple(name for name in DEFAULT_RUNTIMES if name in able)


def benchmark(
    model: Model,
    config: BenchConfig,
    workdir: str | os.PathLike[str],
    *,
    on_step: Callable[[str], None] = lambda _: None,
    on_measure: Callable[[str, float], None] | None = None,
) -> BenchResult:
    """Build what each runtime needs in `workdir`, check every runtime's outputs, time them."""
    runtimes = runnable_runtimes(model, config.runtimes, config.options.device)
    given = {"--data": bool(config.sentences), "--tokens": config.token_range is not None}
    refuse_text_options(model.family, model.name, given)
    on_step("reading the machine")
    machine = detect()
    on_step("building the workload")
    workload = model.family.workload(
        config.batch_sizes,
        texts=config.sentences or None,
        batches_per_size=config.batches_per_size,
        token_range=config.token_range,
        seed=config.seed,
    )
    builder = ArtifactBuilder(PassContext(model=model, workdir=Path(workdir), machine=machine))
    references = {}
    for size, batches in workload.batches.items():
        on_step(f"reference outputs at batch {size}")
        references[size] = reference_outputs(model, batches)

    sessions: dict[str, Session] = {}
    memory: dict[str, float] = {}
    sizes: dict[str, float] = {}
    for name in runtimes:
        on_step(f"building what {name} runs, verified against the original")
        artifact = builder.build((), RUNTIMES[name].formats)
        on_step(f"opening {name}")
        with memory_added(config.options.device) as added:
            session = open_session(name, artifact, config.options)
            session.run(workload.batches[min(workload.batches)][0])  # lazy init, compile
        memory[name] = added[0]
        sessions[name] = session
        sizes[name] = artifact.size_mb()

    rows = []
    for size, batches in workload.batches.items():
        qualities = {}
        for name, session in sessions.items():
            on_step(f"checking {name} at batch {size}")
            qualities[name] = fidelity(model, session, batches, references[size])
        on_step(f"timing batch {size}")
        perfs = measure(
            sessions,
            batches,
            config.measure,
            on_progress=on_measure,
            tokens=real_tokens(model.family, batches),
        )
        rows += [
            BenchRow(
                runtime=name,
                batch_size=size,
                perf=perfs[name],
                quality=qualities[name],
                settings=session.describe(),
                memory_mb=memory[name],
                size_mb=sizes[name],
            )
            for name, session in sessions.items()
        ]
    return BenchResult(machine, model, workload, rows, reference_runtime(model.original()))
