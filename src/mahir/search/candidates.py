"""Which recipes are worth trying on this machine, most promising first.

A candidate is a recipe (passes + runtime + settings) with a readable name. The device decides
the list: a CUDA GPU's is `cuda.py`'s; the CPU's is below. On a CPU, the machine decides
what is proposed: int8 only where the CPU multiplies int8 in hardware (VNNI or AMX; elsewhere it
is slower than fp32 more often than not), bf16 only where the CPU has bf16 instructions, the
OpenVINO throughput hint only when the objective is throughput. What is left out is returned
too, with the reason, so the report can say why it was never tried. The order matters when
the time budget runs short: the search builds candidates in this order.

Sits beside search: it imports the pass configs and the recipe, nothing that runs a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mahir.hardware import Machine
from mahir.model import Model
from mahir.passes.conversion import OpenVinoDirect
from mahir.passes.fallback import AccuracyAwareInt8
from mahir.passes.graph import TransformerFusion
from mahir.passes.nncf import NncfAccuracyControl, NncfInt8
from mahir.passes.prune_transformer import TransformerPrune
from mahir.passes.quantize import DynamicInt8, StaticInt8
from mahir.passes.torchao import TorchaoInt8
from mahir.recipe import Recipe
from mahir.runtimes import reference_runtime
from mahir.search.cuda import Entry, cuda_baseline, cuda_entries, onnxruntime_entries
from mahir.types import CPU, Device, OpenVinoOptions, RuntimeOptions

Objective = Literal["latency", "throughput"]

TUNING_MARGIN = 0.5
"""Passes that tune themselves to the budget (accuracy control, float fallback) aim at this
share of the allowed drop: they see only the calibration inputs, and the budget must then hold
on held-out inputs too (a winner tuned to exactly 0.98 on its sample gave 0.979 on unseen
sentences)."""

BASELINE_LABELS = {"torch": "PyTorch eager fp32", "onnxruntime": "ONNX Runtime fp32"}
"""What the original is called, by the runtime that runs it as given (see `baseline`)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    id: str
    """Short, unique and stable across runs: the name in tables, `--only` and the cache."""
    label: str
    """What a person reads in the report."""
    recipe: Recipe


def baseline(model: Model) -> Candidate:
    """The original as given, on the runtime that gives its reference answers: PyTorch eager
    for a torch module, ONNX Runtime for an ONNX file. Every speedup is measured against it."""
    runtime = reference_runtime(model.original())
    label = BASELINE_LABELS.get(runtime, runtime)
    return Candidate(runtime, label, Recipe((), runtime))


def propose(
    model: Model,
    machine: Machine,
    objective: Objective,
    *,
    max_drop: float = 0.01,
    device: Device = CPU,
) -> tuple[list[Candidate], list[tuple[Candidate, str]]]:
    """Candidates for `model` on `device` of `machine`, the baseline first, and what was left
    out and why. A candidate that would only repeat the baseline (ONNX Runtime fp32 for an ONNX
    source) is not proposed."""
    if device.kind == "cuda":
        first = Candidate(*cuda_baseline(model, device))
        entries = cuda_entries(model, machine, device) + onnxruntime_entries(model, device)
        return _split(first, entries)
    return _split(baseline(model), _cpu_entries(model, machine, objective, max_drop))


def _split(
    first: Candidate, entries: list[Entry]
) -> tuple[list[Candidate], list[tuple[Candidate, str]]]:
    """The baseline and the proposed entries; the entries left out, with why."""
    entries = [e for e in entries if e[0] != first.id]
    proposed = [Candidate(i, label, recipe) for i, label, recipe, why in entries if why is None]
    skipped = [(Candidate(i, label, r), why) for i, label, r, why in entries if why is not None]
    return [first, *proposed], skipped


def _cpu_entries(
    model: Model, machine: Machine, objective: Objective, max_drop: float
) -> list[Entry]:
    f32 = RuntimeOptions(openvino=OpenVinoOptions(precision="f32", hint=_hint(objective)))
    default = RuntimeOptions(openvino=OpenVinoOptions(precision=None, hint=_hint(objective)))
    int8 = machine.int8_dot_product
    bf16 = machine.has("avx512_bf16") or machine.has("amx_bf16")
    transformer = model.family.transformer
    aim = max_drop * TUNING_MARGIN  # what self-tuning passes aim at, with room for unseen inputs
    return [
        ("torch", "PyTorch eager fp32", Recipe((), "torch"), _needs_module(model)),
        ("onnxruntime", "ONNX Runtime fp32", Recipe((), "onnxruntime"), None),
        (
            "openvino-default",
            "OpenVINO, its default precision" + (" (bf16 here)" if bf16 else " (f32 here)"),
            Recipe((), "openvino", default),
            None,
        ),
        (
            "openvino-nncf-int8",
            f"OpenVINO + NNCF int8, float fallback to half the budget (max drop {aim:g})",
            Recipe((NncfAccuracyControl(max_drop=aim),), "openvino", f32),
            _needs_int8(int8),
        ),
        (
            "openvino-direct-nncf-int8",
            "OpenVINO + NNCF int8 with float fallback, converted through torch.export, not ONNX",
            Recipe((OpenVinoDirect(), NncfAccuracyControl(max_drop=aim)), "openvino", f32),
            _needs_int8(int8) or _needs_module(model),
        ),
        (
            "openvino-direct-default",
            "OpenVINO, its default precision, converted through torch.export"
            + (" (bf16 here)" if bf16 else " (f32 here)"),
            Recipe((OpenVinoDirect(),), "openvino", default),
            _needs_module(model),
        ),
        (
            "ort-dynamic-int8",
            "ONNX Runtime, dynamic int8 (per-channel)",
            Recipe((DynamicInt8(per_channel=True),), "onnxruntime"),
            _needs_int8(int8),
        ),
        (
            "ort-fused-dynamic-int8",
            "ONNX Runtime, transformer fusion + dynamic int8 (per-channel)",
            Recipe((TransformerFusion(), DynamicInt8(per_channel=True)), "onnxruntime"),
            _needs_int8(int8) or _needs_transformer(transformer),
        ),
        (
            "openvino-nncf-int8-bf16",
            "OpenVINO + NNCF int8, the rest in the default precision",
            Recipe((NncfInt8(),), "openvino", default),
            _needs_int8(int8) or (None if bf16 else "no bf16 instructions: same as f32 rest"),
        ),
        ("openvino-f32", "OpenVINO fp32", Recipe((), "openvino", f32), None),
        (
            "ort-fused",
            "ONNX Runtime, transformer fusion",
            Recipe((TransformerFusion(),), "onnxruntime"),
            _needs_transformer(transformer),
        ),
        (
            "torch-compile",
            "torch.compile (inductor) fp32",
            Recipe((), "torch-compile"),
            _needs_module(model),
        ),
        (
            "ort-static-int8",
            "ONNX Runtime, static int8 (QDQ, minmax calibration)",
            Recipe((StaticInt8(),), "onnxruntime"),
            _needs_int8(int8),
        ),
        (
            "ort-static-int8-fallback",
            "ONNX Runtime, static int8 with the most sensitive MatMuls kept float to the budget",
            Recipe(
                (AccuracyAwareInt8(min_cosine_mean=1 - aim, min_cosine_worst=1 - 2 * aim),),
                "onnxruntime",
            ),
            _needs_int8(int8),
        ),
        (
            "torch-compile-torchao-int8",
            "torch.compile + torchao int8 (dynamic activations, int8 weights)",
            Recipe((TorchaoInt8(),), "torch-compile"),
            _needs_int8(int8) or _needs_module(model),
        ),
        (
            "pruned-30-nncf-int8",
            "30% of heads and FFN neurons pruned, OpenVINO + NNCF int8",
            Recipe((TransformerPrune(), NncfInt8()), "openvino", f32),
            _needs_int8(int8) or _needs_transformer(transformer),
        ),
    ]


def _hint(objective: Objective) -> Literal["latency", "throughput"]:
    return "throughput" if objective == "throughput" else "latency"


def _needs_int8(int8: bool) -> str | None:
    if int8:
        return None
    return "no int8 dot-product instructions (VNNI or AMX): int8 would not pay on this CPU"


def _needs_module(model: Model) -> str | None:
    return None if model.module is not None else "needs the PyTorch module; this model is ONNX"


def _needs_transformer(transformer: bool) -> str | None:
    return None if transformer else "transformer-only technique; this model is not a transformer"
