"""The contracts between mahir's rooms, in one short file.

Everything above the runtimes (measurement, quality, search, serving) sees a model only as a
`Session`: named numpy arrays in, named numpy arrays out. Nothing here imports a framework.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from mahir.errors import BadInput

Inputs = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]

Dim = int | str
"""A tensor dimension: a fixed size, or the name of a dynamic axis ("batch", "sequence")."""

ArtifactFormat = Literal["torch", "onnx", "openvino", "gguf", "hf"]
"""Where a model lives: a live torch module, an ONNX file, an OpenVINO IR, a GGUF file, or a
Hugging Face folder ("hf", `path` the folder) for engines that load it themselves."""

BATCH = "batch"
SEQUENCE = "sequence"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input: its name, numpy dtype name and shape with named dynamic axes."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True, slots=True)
class InputSpec:
    """What a model takes and gives: its inputs and the names of its outputs, in order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]
    max_sequence: int | None = None
    """The longest sequence the model reads (its position table), where known: padding for
    shape buckets stops here."""
    packed: bool = False
    """The module takes its batch packed (`runtimes/packing.py`): callers still give padded
    batches, which its session lays out as one row of real tokens."""

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def sequence_inputs(self) -> frozenset[str]:
        """Inputs whose axis 1 is the sequence: what batching pads and token checks measure."""
        return frozenset(t.name for t in self.inputs if t.shape[1:2] == (SEQUENCE,))

    @property
    def dynamic_dims(self) -> frozenset[str]:
        return frozenset(d for t in self.inputs for d in t.shape if isinstance(d, str))


@dataclass(frozen=True, slots=True)
class TokenLimits:
    """What a text model's token inputs may hold: beyond these an embedding lookup reads past
    its table, which one runtime reports as an error and another may answer with garbage."""

    positions: int | None
    """Tokens per sequence at most (the position table's usable rows); None: not known."""
    vocab_size: int
    """Token ids must be in [0, vocab_size)."""
    type_vocab_size: int | None = None
    """Token type ids must be in [0, type_vocab_size); None: the model takes none."""


@dataclass(frozen=True)
class Artifact:
    """A model in one runnable format: files on disk (`path`), or for format "torch" a live
    `module` (a torch.nn.Module taking the spec's inputs by keyword, returning a tuple of
    tensors in the spec's output order)."""

    format: ArtifactFormat
    spec: InputSpec
    path: Path | None = None
    module: Any = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def files(self) -> list[Path]:
        """The files on disk that make up the artifact, main file first: an ONNX model and its
        external data, or an OpenVINO IR's .xml and .bin; a folder's files. None for a live
        torch module."""
        if self.path is None:
            return []
        if self.path.is_dir():
            return sorted(p for p in self.path.rglob("*") if p.is_file())
        companion = (
            self.path.with_suffix(".bin")
            if self.path.suffix == ".xml"
            else self.path.with_name(self.path.name + ".data")
        )
        return [p for p in (self.path, companion) if p.is_file()]

    def size_mb(self) -> float:
        """Bytes on disk of the artifact's files, or of a torch module's parameters and buffers."""
        if self.module is not None:
            return module_mb(self.module)
        return sum(p.stat().st_size for p in self.files()) / 2**20

    def derive(
        self,
        path: Path | None = None,
        format: ArtifactFormat | None = None,
        module: Any = None,
        spec: InputSpec | None = None,
        **step: Any,
    ) -> Artifact:
        """The next artifact in a chain of passes: same spec unless a pass changes what the
        model answers, new files (or a new module), and `step` appended to the history in
        `meta["steps"]`."""
        steps = [*self.meta.get("steps", ()), step]
        meta = {**self.meta, "steps": steps}
        return Artifact(
            format or self.format, spec or self.spec, path=path, module=module, meta=meta
        )


def module_mb(module: Any) -> float:
    """MiB of a torch module's parameters and buffers, as stored."""
    tensors = [*module.parameters(), *module.buffers()]
    return float(sum(_tensor_bytes(t) for t in tensors)) / 2**20


def _tensor_bytes(tensor: Any) -> int:
    """Bytes a tensor holds. A tensor subclass (torchao's int8 weights) reports the dtype it
    computes in, not what it stores: its inner tensors are counted instead."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = flatten()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return int(tensor.numel() * tensor.element_size())


class Session(Protocol):
    """The one way to execute any artifact on any runtime, on one device."""

    runtime: str
    device: Device
    """Where `run` computes: what measurement synchronises before it reads a clock."""

    def run(self, inputs: Inputs) -> Outputs:
        """Run one batch; outputs are keyed by the spec's output names."""
        ...

    def describe(self) -> dict[str, Any]:
        """The settings actually in effect (threads, precision, hint), for reports."""
        ...


class Pending(Protocol):
    """A batch queued on a device, not yet waited for."""

    def result(self) -> Outputs:
        """Wait for the batch and return its outputs."""
        ...


@runtime_checkable
class Queueing(Session, Protocol):
    """A session that can queue a batch on its device and return at once, so that the host
    prepares the next batch while the device computes this one (`mahir.embed`)."""

    queues: bool
    """Whether `submit` returns before the batch is computed (CUDA graphs); False where it runs
    the batch there and then (a wrapper over a session that cannot queue)."""

    def submit(self, inputs: Inputs) -> Pending:
        """Queue one batch; `run(inputs)` is `submit(inputs).result()`."""
        ...


_DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")
DEVICE_KINDS = ("cpu", "cuda")


@dataclass(frozen=True, slots=True)
class Device:
    """Where a session computes: the host's CPU, or one CUDA GPU by its index. Written and read
    as "cpu" or "cuda:N" (`str`, `Device.parse`)."""

    kind: Literal["cpu", "cuda"] = "cpu"
    index: int = 0
    """The GPU's CUDA index; always 0 for the CPU (all its cores are one device)."""

    def __post_init__(self) -> None:
        if self.kind not in DEVICE_KINDS or self.index < 0 or (self.kind == "cpu" and self.index):
            raise BadInput(f"no device {self.kind}:{self.index}: {_DEVICE_HELP}")

    @classmethod
    def parse(cls, text: str) -> Device:
        """The device "cpu", "cuda" (GPU 0) or "cuda:N" names; anything else is refused."""
        match = _DEVICE.fullmatch(text.strip().lower())
        if match is None or (match[1] == "cpu" and match[2] is not None):
            raise BadInput(f"unknown device {text!r}: {_DEVICE_HELP}")
        kind: Literal["cpu", "cuda"] = "cpu" if match[1] == "cpu" else "cuda"
        return cls(kind, int(match[2] or 0))

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


_DEVICE_HELP = 'give "cpu", "cuda" (GPU 0) or "cuda:N" (N the GPU\'s index)'

CPU = Device()


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenVinoOptions:
    """Settings only OpenVINO has (ONNX Runtime and PyTorch need none beyond `RuntimeOptions`)."""

    hint: Literal["latency", "throughput"] = "latency"
    """PERFORMANCE_HINT: one stream for the lowest latency, or several for throughput."""
    precision: Literal["f32", "bf16", "f16"] | None = "f32"
    """INFERENCE_PRECISION_HINT. None lets OpenVINO choose, and it picks bf16 on CPUs with bf16
    instructions (avx512_bf16 or AMX): an "fp32" model is then not run in fp32."""
    streams: int | None = None
    """NUM_STREAMS: batches the CPU plugin runs at once, the threads split among them (a server
    with that many workers); None: what the hint implies."""

    def __post_init__(self) -> None:
        if self.streams is not None and (not isinstance(self.streams, int) or self.streams < 1):
            raise ValueError(f"OpenVINO streams must be an integer >= 1, got {self.streams!r}")
        if self.hint not in ("latency", "throughput"):
            raise ValueError(f"the OpenVINO hint is latency or throughput, got {self.hint!r}")
        if self.precision not in ("f32", "bf16", "f16", None):
            raise ValueError(
                f"the OpenVINO precision is f32, bf16, f16 or null, got {self.precision!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeOptions:
    """Settings a runtime is opened with: those every runtime takes, then one field per runtime
    that has settings of its own (the others ignore it). `None`: the runtime's own choice for
    this machine. Written as `to_dict` gives and read back with `from_dict`, which also reads
    the flat form of recipes and output directories written before devices existed."""

    threads: int | None = None
    """Intra-op threads; default: the machine's physical cores."""
    device: Device = CPU
    """Where the session computes; a runtime that cannot run there refuses to open."""
    openvino: OpenVinoOptions = OpenVinoOptions()
    """OpenVINO's hint and precision."""
    slots: int = 1
    """LLM sequences the engines mahir batches by slots decode together (continuous batching; a
    server then generates that many at once); 1: one generation at a time. Other runtimes
    ignore it."""
    step_tokens: int | None = None
    """With slots: the most prompt tokens one step of the continuous batch feeds (llama.cpp
    counts the decode tokens in it too), so a joining prompt goes in chunks; fewer keep the
    time between tokens even, more fill the machine. None: the engine's own (256)."""
    prefix_cache: bool = False
    """LLM engines with a prefix cache (vLLM) keep the KV blocks of prompts, so a later request
    that starts alike (a system prompt, a chat's earlier turns) prefills only the rest: what a
    server wants. Off by default: timing needs a repeated prompt prefilled again."""

    def __post_init__(self) -> None:
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")
        if not isinstance(self.slots, int) or self.slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {self.slots!r}")
        step = self.step_tokens
        if step is not None and (not isinstance(step, int) or step < self.slots):
            raise ValueError(f"step_tokens must be an integer >= slots, got {step!r}")
        if not isinstance(self.device, Device):
            raise ValueError(f"device must be a Device (Device.parse({self.device!r})), got text")
        if not isinstance(self.openvino, OpenVinoOptions):
            raise ValueError(f"openvino must be OpenVinoOptions, got {self.openvino!r}")
        if not isinstance(self.prefix_cache, bool):
            raise ValueError(f"prefix_cache is true or false, got {self.prefix_cache!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for recipe.yaml, mahir.json and records: the device as "cpu"/"cuda:N"."""
        return (
            {
                "threads": self.threads,
                "device": str(self.device),
                "openvino": {"hint": self.openvino.hint, "precision": self.openvino.precision}
                | ({"streams": self.openvino.streams} if self.openvino.streams else {}),
            }
            | ({"slots": self.slots} if self.slots > 1 else {})
            | ({"step_tokens": self.step_tokens} if self.step_tokens is not None else {})
            | ({"prefix_cache": True} if self.prefix_cache else {})
        )

    def for_workers(self, workers: int) -> RuntimeOptions:
        """These options for a session that runs `workers` batches at once, for a runtime with
        `worker_streams` (OpenVINO compiles that many streams)."""
        if workers == 1:
            return self
        return dataclasses.replace(
            self, openvino=dataclasses.replace(self.openvino, streams=workers)
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RuntimeOptions:
        """The options `to_dict` wrote; also the older flat form (`openvino_hint`,
        `openvino_precision`, no device: the CPU). BadInput names what is wrong."""
        if data is not None and not isinstance(data, Mapping):
            raise BadInput(f"runtime options are a mapping, got {data!r}")
        shared = dict(data or {})
        openvino = shared.pop("openvino", None) or {}
        if not isinstance(openvino, Mapping):
            raise BadInput(f"`openvino:` options are a mapping, got {openvino!r}")
        openvino = dict(openvino)
        for old, new in _FLAT_OPENVINO.items():
            if old in shared:
                openvino.setdefault(new, shared.pop(old))
        known = ("threads", "device", "openvino", "slots", "step_tokens", "prefix_cache")
        _refuse_unknown(shared, known, "runtime option")
        _refuse_unknown(openvino, ("hint", "precision", "streams"), "OpenVINO option")
        device = shared.get("device", "cpu")
        if not isinstance(device, str):
            raise BadInput(f"unknown device {device!r}: {_DEVICE_HELP}")
        try:
            return cls(
                threads=shared.get("threads"),
                device=Device.parse(device),
                openvino=OpenVinoOptions(**openvino),
                slots=shared.get("slots", 1),
                step_tokens=shared.get("step_tokens"),
                prefix_cache=shared.get("prefix_cache", False),
            )
        except ValueError as err:
            raise BadInput(str(err)) from err


_FLAT_OPENVINO = {"openvino_hint": "hint", "openvino_precision": "precision"}
"""Keys of the flat options written before per-runtime options, and where they went."""


def _refuse_unknown(data: Mapping[str, Any], known: tuple[str, ...], what: str) -> None:
    unknown = [key for key in data if key not in known]
    if unknown:
        raise BadInput(f"unknown {what} {unknown[0]!r}: known are {', '.join(known)}")


@dataclass(frozen=True, slots=True)
class OutputFidelity:
    """How close one output (or the pooled sentence embedding) is to the reference."""

    max_abs_err: float
    max_rel_err: float
    cosine_mean: float
    cosine_min: float
    top1_agreement: float | None = None
    """Share of samples whose argmax matches the reference; only for logits."""


@dataclass(frozen=True, slots=True)
class Quality:
    """Fidelity of every output against the fp32 reference, plus the sentence embedding when
    the model has a pooling config. `headline` is what tables and budgets look at."""

    outputs: Mapping[str, OutputFidelity]
    embedding: OutputFidelity | None = None

    @property
    def headline(self) -> OutputFidelity:
        if self.embedding is not None:
            return self.embedding
        return min(self.outputs.values(), key=lambda f: f.cosine_min)


@dataclass(frozen=True, slots=True)
class Perf:
    """Timing of one session at one batch size. Latencies are per batch, in milliseconds."""

    batch_size: int
    latencies_ms: tuple[float, ...]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float
    """Samples per second over all timed runs."""
    tokens_per_s: float | None
    """Real (unpadded) tokens per second, for text models."""
    spread: float
    """Inter-quartile range over median of each latency relative to its own batch's median:
    the machine's jitter, not the workload's mix of lengths."""
    noisy: bool
    """True when the spread or the drift between rounds is too large to trust small differences."""
    other_load: float = 0.0
    """CPU cores other processes kept busy, on average, while this was timed: on a busy
    machine PyTorch's OpenMP threads stall while other runtimes barely move, so ratios taken
    then are not the machine's (see `mahir.measure.BUSY_CORES`)."""
    device: str = "cpu"
    """The device timed ("cpu", "cuda:N"): its clock took the latencies."""
